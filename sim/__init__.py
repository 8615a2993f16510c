"""Simulated tasks behind one name space: `builtin/<name>`, `metaworld/<v3 task>`, `pusht`.

`make_env(task)` returns a gymnasium env whose observations are dicts keyed by the store's feature keys
(`observation.state`, `observation.images.<cam>`); `make_expert(task)` returns the task's scripted expert
(an object with `reset(seed)` and `act(obs) -> action`) that acts from observations alone, so it also
drives envs living in subprocesses.
"""

from __future__ import annotations

from typing import Any


class UnknownTaskError(ValueError):
    """A task name that no simulator here provides."""


def _split(task: str) -> tuple[str, str]:
    family, _, name = task.partition("/")
    if family == "pusht" and not name:
        return "pusht", "pusht"
    if family not in ("builtin", "metaworld") or not name:
        raise UnknownTaskError(
            f"Unknown task {task!r}: use builtin/<name> ({', '.join(list_tasks('builtin'))}), "
            "metaworld/<v3 task, e.g. push-v3, or mt10 / mt50>, or pusht."
        )
    return family, name


def make_env(task: str, **kwargs: Any):
    """Build one environment for `task`; kwargs: images, image_size, max_episode_steps, control, ..."""
    family, name = _split(task)
    if family == "builtin":
        from sim.builtin import BUILTIN_TASKS, make_builtin_env

        if name not in BUILTIN_TASKS:
            raise UnknownTaskError(f"Unknown built-in task {name!r}: available are {', '.join(BUILTIN_TASKS)}.")
        return make_builtin_env(name, **kwargs)
    if family == "metaworld":
        from sim.metaworld_adapter import MULTI_TASK_SETS, MetaWorldMultiTask, make_metaworld_env

        if name in MULTI_TASK_SETS:
            return MetaWorldMultiTask(name, **kwargs)
        return make_metaworld_env(name, **kwargs)
    from sim.pusht import make_pusht_env

    return make_pusht_env(**kwargs)


def make_expert(task: str, **kwargs: Any):
    """The task's scripted expert; kwargs: noise (action noise std), sloppy (bool), seed."""
    family, name = _split(task)
    if family == "builtin":
        from sim.builtin import BUILTIN_TASKS, make_builtin_expert

        if name not in BUILTIN_TASKS:
            raise UnknownTaskError(f"Unknown built-in task {name!r}: available are {', '.join(BUILTIN_TASKS)}.")
        return make_builtin_expert(name, **kwargs)
    if family == "metaworld":
        from sim.metaworld_adapter import MULTI_TASK_SETS, MetaWorldExpert, MetaWorldMultiExpert

        if name in MULTI_TASK_SETS:
            return MetaWorldMultiExpert(name, **kwargs)
        return MetaWorldExpert(name, **kwargs)
    raise UnknownTaskError("Task 'pusht' has no scripted expert: import demonstrations instead (robopolicy data import).")


def list_tasks(family: str | None = None) -> list[str]:
    """Task names; MetaWorld's are listed only when metaworld is installed."""
    names: list[str] = []
    if family in (None, "builtin"):
        from sim.builtin import BUILTIN_TASKS

        names += list(BUILTIN_TASKS) if family else [f"builtin/{n}" for n in BUILTIN_TASKS]
    if family in (None, "metaworld"):
        try:
            from sim.metaworld_adapter import MULTI_TASK_SETS, metaworld_task_names

            mw = [*MULTI_TASK_SETS, *metaworld_task_names()]
            names += mw if family else [f"metaworld/{n}" for n in mw]
        except ImportError:
            pass
    if family is None:
        names.append("pusht")
    return names
