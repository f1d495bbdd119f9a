"""Sagas: long-running work coordinated from the log, with compensations.

A project declares a saga (:class:`Saga`, :class:`Step`) and the participants that answer
its commands (:class:`Participant`); evp runs them exactly once from the events topic.
"""

from projections.sagas.declaration import Command, Retry, Saga, SagaContext, Step

__all__ = ["Command", "Retry", "Saga", "SagaContext", "Step"]
