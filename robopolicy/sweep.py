"""`robopolicy sweep`: one command (train or finetune) over seeds x settings, gathered into one table.

    robopolicy sweep out=runs/sweep seeds=[0,1,2] 'settings=["policy=mlp","policy=flow"]' \
        data=datasets/quickstart_pick_place steps=2000 eval.final_episodes=50

The sweep's own keys are those of `SweepConfig`; every other override goes to each run, as `base` does.

Every setting (a string of overrides, e.g. "policy=mlp optim.lr=1e-3") runs once per seed, in turn, in
`out/runs/<setting>_seed<seed>`; a run whose summary is already there is read, not rerun, so a stopped sweep
continues where it stopped. The table has one row per run (results.csv, results.json) and one per setting: the
success rate pooled over the seeds' evaluation episodes with its 95% Wilson interval, and the spread of the per-seed
rates (a seed's luck and the evaluation's both show). results.png draws the settings side by side.
"""

from __future__ import annotations

import csv
import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from robopolicy.config import register_config, setting
from robopolicy.metrics import wilson_interval


@register_config("command", "sweep")
@dataclass(kw_only=True)
class SweepConfig:
    command: str = setting("train", "the command of every run", choices=("train", "finetune"))
    out: str = setting(doc="the sweep folder: runs/, results.csv, results.json, results.png")
    seeds: list[int] = setting([0, 1, 2], "every setting runs once per seed (seed=...)")
    settings: list[str] = setting([""], "overrides per setting, one string each, e.g. "
                                        "'settings=[\"optim.lr=1e-3\",\"optim.lr=3e-4\"]'")
    base: list[str] = setting([], "overrides of every run; any override that is not a sweep key is added here")


class SweepError(ValueError):
    """A sweep that cannot run as asked."""


def split_overrides(overrides: list[str]) -> tuple[list[str], list[str]]:
    """(the sweep's own overrides, those of every run)."""
    import dataclasses

    own_keys = {f.name for f in dataclasses.fields(SweepConfig)}
    own = [o for o in overrides if o.split("=", 1)[0].lstrip("+~") in own_keys]
    return own, [o for o in overrides if o not in own]


def run_name(setting_overrides: str, seed: int) -> str:
    slug = re.sub(r"[^A-Za-z0-9.-]+", "_", setting_overrides.replace("=", "-").strip()).strip("_") or "default"
    return f"{slug}_seed{seed}"


def evaluation(summary: dict[str, Any]) -> dict[str, Any] | None:
    """The final evaluation in a command's summary (train: eval; finetune: final_eval)."""
    found = summary.get("eval") or summary.get("final_eval")
    return found if isinstance(found, dict) and "successes" in found else None


def sweep(cfg: SweepConfig, run: Callable[[str, list[str]], dict], *, base: list[str] = (),
          log: Callable[[str], None] = print) -> dict:
    """Run every (setting, seed) with `run(command, overrides)` (the CLI's), then write the tables. `base`: more
    overrides of every run, after `cfg.base`."""
    base = [*cfg.base, *base]
    if not cfg.seeds or not cfg.settings:
        raise SweepError("sweep needs at least one seed and one setting (settings=[\"\"] runs the base alone).")
    if len(set(cfg.settings)) != len(cfg.settings):
        raise SweepError(f"settings lists a setting twice: {cfg.settings}.")
    for override in base + [o for s in cfg.settings for o in s.split()]:
        if override.split("=", 1)[0] in ("seed", "out"):
            raise SweepError(f"{override!r}: the sweep sets seed and out of each run itself.")
    out = Path(cfg.out)
    rows = []
    for setting_overrides in cfg.settings:
        for seed in cfg.seeds:
            folder = out / "runs" / run_name(setting_overrides, seed)
            if (folder / "summary.json").is_file():
                summary = json.loads((folder / "summary.json").read_text())
                log(f"{folder.name}: done before, read")
            else:
                log(f"{folder.name}: running {cfg.command} {' '.join(base)} {setting_overrides}")
                summary = run(cfg.command, [*base, *setting_overrides.split(), f"seed={seed}", f"out={folder}",
                                            "overwrite=true"])
            ev = evaluation(summary) or {}
            rows.append({"setting": setting_overrides or "default", "seed": seed,
                         "success_rate": ev.get("success_rate"), "successes": ev.get("successes"),
                         "episodes": ev.get("episodes"), "final_loss": summary.get("final_loss"),
                         "seconds": summary.get("wall_seconds"), "run": str(folder)})
    table = per_setting(rows)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "results.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    (out / "results.json").write_text(json.dumps({"command": cfg.command, "base": base, "seeds": cfg.seeds,
                                                  "settings": table, "runs": rows}, indent=2))
    plot(table, out / "results.png")
    width = max(len(s["setting"]) for s in table)
    lines = [f"  {s['setting']:<{width}}  {_rate(s)}" for s in table]
    log("\n".join(["", f"sweep of {cfg.command}: success over {len(cfg.seeds)} seeds", *lines, ""]))
    return {"command": "sweep", "runs": len(rows), "settings": table, "csv": str(out / "results.csv"),
            "plot": str(out / "results.png"), "summary": str(out / "results.json")}


def per_setting(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per setting: pooled successes / episodes over its seeds, the Wilson interval, per-seed mean and spread."""
    import numpy as np

    table = []
    for name in dict.fromkeys(r["setting"] for r in rows):
        runs = [r for r in rows if r["setting"] == name]
        entry: dict[str, Any] = {"setting": name, "seeds": len(runs),
                                 "final_loss_mean": _mean([r["final_loss"] for r in runs])}
        evaluated = [r for r in runs if r["episodes"]]
        if evaluated:
            k, n = sum(r["successes"] for r in evaluated), sum(r["episodes"] for r in evaluated)
            rates = np.array([r["success_rate"] for r in evaluated], dtype=float)
            entry.update(successes=k, episodes=n, success_rate=k / n,
                         success_ci95=[round(x, 4) for x in wilson_interval(k, n)],
                         seed_mean=float(rates.mean()), seed_std=float(rates.std(ddof=1)) if len(rates) > 1 else 0.0)
        table.append(entry)
    return table


def _mean(values: list) -> float | None:
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None


def _rate(entry: dict[str, Any]) -> str:
    if "success_rate" not in entry:
        return f"no evaluation (final loss {entry['final_loss_mean']})"
    lo, hi = entry["success_ci95"]
    return (f"{entry['success_rate']:.2f} [{lo:.2f}, {hi:.2f}] over {entry['episodes']} episodes "
            f"(per seed {entry['seed_mean']:.2f} +- {entry['seed_std']:.2f})")


def plot(table: list[dict[str, Any]], path: Path) -> None:
    """Pooled success rate per setting with its 95% Wilson interval (the final loss where nothing was evaluated)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(max(4.0, 1.2 * len(table) + 2), 3.5))
    x = list(range(len(table)))
    if all("success_rate" in s for s in table):
        rate = [s["success_rate"] for s in table]
        err = [[r - s["success_ci95"][0] for r, s in zip(rate, table)],
               [s["success_ci95"][1] - r for r, s in zip(rate, table)]]
        ax.errorbar(x, rate, yerr=err, fmt="o", capsize=4)
        ax.set(ylabel="success rate (95% Wilson)", ylim=(-0.02, 1.02))
    else:
        ax.plot(x, [s["final_loss_mean"] or 0.0 for s in table], "o")
        ax.set(ylabel="final loss (mean over seeds)")
    ax.set_xticks(x, [s["setting"] for s in table], rotation=20, ha="right", fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
