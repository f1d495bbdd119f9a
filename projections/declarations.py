"""The views a project declares: loading them by name, and catching all of them up.

A project names its views in ``evp.toml`` (``[views] orders = "shop.views:Orders"``);
everything here works from those names, so a script, a test and the command line load a
view the same way.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TypeVar

from events.errors import ConfigurationError
from events.project import Project
from events.settings import Settings
from projections.runner import CatchUpResult, Progress, ProjectionRunner
from projections.sagas.declaration import Saga
from projections.sagas.participant import Participant
from projections.view import View


T = TypeVar("T")


def instantiate(project: Project, kind: str, name: str, base: type[T]) -> T:
    """The declaration ``kind.name`` of ``project`` (a name or a ``module:Class`` spec), instantiated.

    Raises :class:`ConfigurationError` naming the declaration when it is not declared, does
    not import, or is neither a subclass of ``base`` nor an instance of one.
    """
    declared = project.load(kind, name)
    if isinstance(declared, type) and issubclass(declared, base) and declared is not base:
        return declared()
    if isinstance(declared, base):
        return declared
    raise ConfigurationError(
        f"{project.file}: {kind[:-1]} {name!r} is {declared!r}, not a {base.__module__}.{base.__name__} subclass")


def load_view(project: Project, name: str) -> View:
    """The view ``name`` of ``project``, instantiated (see :func:`instantiate`)."""
    return instantiate(project, "views", name, View)


def catch_up_views(
    settings: Settings,
    project: Project,
    names: Sequence[str] | None = None,
    on_progress: Callable[[str, Progress], None] | None = None,
) -> dict[str, CatchUpResult]:
    """Catch every declared view (or those named) up with the end of the log, one after the other.

    1. load each view by name (a bad declaration fails before anything is applied);
    2. catch each one up in its own schema, exactly once (see :class:`ProjectionRunner`);
    3. return what each applied, by name, in declaration order.
    """
    views = {name: load_view(project, name) for name in (names if names is not None else project.names("views"))}
    results: dict[str, CatchUpResult] = {}
    for name, view in views.items():
        report = None if on_progress is None else (lambda progress, name=name: on_progress(name, progress))
        with ProjectionRunner(settings, view) as runner:
            results[name] = runner.catch_up(report)
    return results


def load_sagas(project: Project, names: Sequence[str] | None = None) -> list[Saga]:
    """The project's declared sagas (or those named), instantiated and checked."""
    sagas = [instantiate(project, "sagas", name, Saga) for name in (names if names is not None else project.names("sagas"))]
    for saga in sagas:
        saga.check()
    return sagas


def load_participant(project: Project, name: str) -> Participant:
    """The participant ``name`` of ``project`` (``[participants]``), instantiated."""
    return instantiate(project, "participants", name, Participant)
