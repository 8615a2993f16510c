"""The names every part shares (store, policies, simulators, robots) and the one check that two sets of feature
specs fit together. numpy-free and torch-free: the robot computer imports it too.

A feature spec is `{"dtype": str, "shape": [int, ...], "names": [str, ...] | None}` keyed by a feature key:
`observation.state`, `observation.images.<camera>` (uint8 [H, W, 3]), `action`, `next.reward`, `next.success`.
"""

from __future__ import annotations

from collections.abc import Mapping

STATE_KEY = "observation.state"
IMAGE_PREFIX = "observation.images."
OBSERVATION_PREFIX = "observation."
ACTION_KEY = "action"
REWARD_KEY = "next.reward"
SUCCESS_KEY = "next.success"
STAT_NAMES = ("mean", "std", "min", "max", "q01", "q99")


def is_image_key(key: str) -> bool:
    return key.startswith(IMAGE_PREFIX)


def image_key(camera: str) -> str:
    return IMAGE_PREFIX + camera


def camera_name(key: str) -> str:
    """`observation.images.front` -> `front`."""
    return key[len(IMAGE_PREFIX):]


def policy_features(features: Mapping[str, Mapping]) -> dict[str, dict]:
    """The subset of feature specs a policy consumes: `observation.*` and `action`."""
    return {k: dict(v) for k, v in features.items() if k.startswith(OBSERVATION_PREFIX) or k == ACTION_KEY}


def feature_problems(needed: Mapping[str, Mapping], offered: Mapping[str, Mapping], *,
                     extra_ok: bool = True, check_dtype: bool = False) -> list[str]:
    """How `offered` features fail to supply the `needed` ones: missing keys, other shapes (and dtypes with
    `check_dtype`), and keys `needed` lacks unless `extra_ok`. Empty when they fit. Every key given is compared:
    pass `policy_features(...)` of both sides to compare only what a policy consumes."""
    problems = []
    missing = sorted(set(needed) - set(offered))
    if missing:
        problems.append(f"{', '.join(missing)} {'is' if len(missing) == 1 else 'are'} missing")
    extra = sorted(set(offered) - set(needed))
    if extra and not extra_ok:
        problems.append(f"{', '.join(extra)} {'is' if len(extra) == 1 else 'are'} not used")
    for key in sorted(set(needed) & set(offered)):
        want, have = list(needed[key]["shape"]), list(offered[key]["shape"])
        if want != have:
            problems.append(f"{key} has shape {have} where {want} is expected")
        elif check_dtype and needed[key].get("dtype") != offered[key].get("dtype"):
            problems.append(f"{key} has dtype {offered[key].get('dtype')} where {needed[key].get('dtype')} is expected")
    return problems


def feature_mismatch(needed: Mapping[str, Mapping], offered: Mapping[str, Mapping], what: str = "features", *,
                     extra_ok: bool = True, check_dtype: bool = False) -> str | None:
    """One sentence naming how `offered` fails `needed` ("The features of X do not match: ..."), or None."""
    problems = feature_problems(needed, offered, extra_ok=extra_ok, check_dtype=check_dtype)
    return f"The {what} do not match: {'; '.join(problems)}." if problems else None


def renamed_features(needed: Mapping[str, Mapping], offered: Mapping[str, Mapping]) -> dict[str, tuple[str, str]]:
    """Keys of both whose dimensions are named differently (a store collected before a simulator renamed them): the
    first name that differs on each side, per key. Shapes fitting, the data still fit; only a policy that reads
    names (the vla groups state dimensions into entity tokens by them) sees the difference."""
    renamed = {}
    for key in sorted(set(needed) & set(offered)):
        differ = [(str(w), str(h)) for w, h in zip(needed[key].get("names") or [], offered[key].get("names") or [])
                  if w != h]
        if differ:
            renamed[key] = differ[0]
    return renamed
