"""`megatron-rlhf report RUN_DIR`: plots and a markdown summary of a pipeline run.

RUN_DIR holds stage folders (sft/, rm/, ppo/, any may be missing; other folders
with a metrics.jsonl are reported after them) or is itself one stage folder.
Each stage has metrics.jsonl (one JSON object per line with "step" and metric
keys; a line may carry only some keys) and config.yaml. Writes one PNG per
stage and summary.md into --out (default RUN_DIR/report).

Related curves share a panel (training vs held-out, chosen vs rejected reward, the
PPO timings, the learning rates; see PANEL_GROUPS); a metric logged at one step only
(the RM's normalisation bias) is in the summary table, not plotted.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
from dataclasses import dataclass, field
from typing import Sequence

STAGE_ORDER = ("sft", "rm", "ppo", "dpo", "grpo", "rloo")
# The metric contract of each stage, in panel order; other numeric keys get
# generic panels after these.
KNOWN_METRICS = {
    "sft": ("train/loss", "eval/loss", "lr", "tokens_per_s"),
    "rm": ("train/loss", "train/accuracy", "eval/loss", "eval/accuracy",
           "eval/chosen_reward", "eval/rejected_reward", "eval/margin"),
    "ppo": ("rollout/reward", "rollout/kl", "rollout/response_length", "policy/clipfrac",
            "policy/approx_kl", "policy/entropy", "value/loss", "ptx/loss",
            "time/generate_s", "time/score_s", "time/train_s", "tokens_per_s"),
    # DPO logs the RM's metrics, of the implicit reward beta * (log pi - log pi_ref)
    "dpo": ("train/loss", "train/accuracy", "eval/loss", "eval/accuracy",
            "eval/chosen_reward", "eval/rejected_reward", "eval/margin"),
    # critic-free RL: no value head; the KL is a loss term when ppo.kl_in_reward=false
    "grpo": ("rollout/reward", "rollout/kl", "rollout/response_length", "policy/clipfrac", "policy/kl_loss",
             "policy/entropy", "time/generate_s", "time/score_s", "time/train_s", "tokens_per_s"),
}
KNOWN_METRICS["rloo"] = KNOWN_METRICS["grpo"]
TITLES = {
    "train/loss": "training loss", "eval/loss": "held-out loss", "lr": "learning rate",
    "tokens_per_s": "throughput (tokens/s)", "train/accuracy": "training pair accuracy",
    "eval/accuracy": "held-out pair accuracy", "eval/chosen_reward": "reward of chosen",
    "eval/rejected_reward": "reward of rejected", "eval/margin": "chosen - rejected reward",
    "rollout/reward": "mean reward of rollouts", "policy/kl_loss": "KL to the reference (loss term)", "rollout/kl": "KL(policy || SFT)",
    "rollout/response_length": "response length (tokens)", "policy/clipfrac": "PPO clip fraction",
    "policy/approx_kl": "approx. KL per update", "policy/entropy": "policy entropy",
    "value/loss": "value-head loss", "ptx/loss": "pretraining-mix (ptx) loss",
    "time/generate_s": "generation time (s)", "time/score_s": "scoring time (s)",
    "time/train_s": "training time (s)",
}
TITLES.update({
    "grad_norm": "gradient norm (before clipping)", "step_time_s": "time per step (s)",
    "critic_lr": "critic learning rate", "policy/policy_loss": "PPO clipped-surrogate loss",
    "value/clipfrac": "value clip fraction", "rollout/kl_coef": "KL coefficient (beta)",
    "rollout/non_score_reward": "KL penalty in the reward", "train/margin": "chosen - rejected reward",
    "train/chosen_reward": "reward of chosen", "train/rejected_reward": "reward of rejected",
})
# Metrics drawn together in one panel, when at least two of them are logged: (title, y label, keys).
# Any other train/X with an eval/X is drawn together too ("X: training vs held-out").
PANEL_GROUPS = (
    ("loss: training vs held-out", "loss", ("train/loss", "eval/loss")),
    ("pair accuracy: training vs held-out", "accuracy", ("train/accuracy", "eval/accuracy")),
    ("reward of chosen vs rejected", "reward",
     ("train/chosen_reward", "train/rejected_reward", "eval/chosen_reward", "eval/rejected_reward")),
    ("chosen - rejected reward (margin)", "reward margin", ("train/margin", "eval/margin")),
    ("time per iteration (s)", "seconds", ("time/generate_s", "time/score_s", "time/train_s")),
    ("learning rates", "learning rate", ("lr", "critic_lr")),
)
LINE_LABELS = {"lr": "policy / model", "critic_lr": "critic"}
MAX_PANELS = 30  # beyond this a figure is unreadable; the rest are listed in summary.md
NCOLS = 3


@dataclass
class Panel:
    title: str
    ylabel: str
    keys: list


def line_label(key: str, keys: Sequence[str]) -> str:
    """Legend text of one curve in a shared panel: where it was measured, and what it is
    when the panel mixes quantities."""
    if key in LINE_LABELS:
        return LINE_LABELS[key]
    prefix, _, leaf = key.rpartition("/")
    where = {"train": "training", "eval": "held-out"}.get(prefix, "")
    leaves = {k.rpartition("/")[2] for k in keys}
    if len(leaves) == 1:
        return where or key
    what = leaf.removesuffix("_reward").removesuffix("_s")
    return f"{what} ({where})" if where else what


class ReportError(Exception):
    """A problem with the run directory; the message names the file and the fix."""


@dataclass
class Stage:
    name: str
    path: str
    rows: list[dict] = field(default_factory=list)       # [{"step": s, key: value, ...}] in file order
    config_text: str | None = None
    ignored: set[str] = field(default_factory=set)       # non-numeric keys, listed not plotted

    def kind(self) -> str | None:
        """Which contract applies: the folder name, else the contract sharing most keys."""
        if self.name in KNOWN_METRICS:
            return self.name
        keys = self.keys()
        best = max(KNOWN_METRICS, key=lambda k: len(keys & set(KNOWN_METRICS[k])))
        return best if keys & set(KNOWN_METRICS[best]) else None

    def keys(self) -> set[str]:
        return {k for r in self.rows for k in r if k != "step"}

    def ordered_keys(self) -> list[str]:
        known = KNOWN_METRICS.get(self.kind() or "", ())
        present = self.keys()
        return [k for k in known if k in present] + sorted(present - set(known))

    def panels(self) -> list["Panel"]:
        """Plot panels in metric order; see PANEL_GROUPS. A metric logged at a single step
        of a longer run (a one-off such as the RM's normalisation bias) gets no panel: it is
        in the summary table."""
        n_steps = len({r["step"] for r in self.rows})
        keys = [k for k in self.ordered_keys() if n_steps <= 1 or len(self.series(k)[0]) > 1]
        present, used, panels = set(keys), set(), []
        for key in keys:
            if key in used:
                continue
            group = next((g for g in PANEL_GROUPS if key in g[2]), None)
            if group is not None and len(present & set(group[2])) > 1:
                members = [k for k in group[2] if k in present]
                panels.append(Panel(group[0], group[1], members))
            elif key.split("/", 1)[0] in ("train", "eval") and {f"train/{key.split('/', 1)[1]}",
                                                                 f"eval/{key.split('/', 1)[1]}"} <= present:
                leaf = key.split("/", 1)[1]
                panels.append(Panel(f"{TITLES.get('train/' + leaf, leaf)}: training vs held-out", leaf,
                                    [f"train/{leaf}", f"eval/{leaf}"]))
            else:
                panels.append(Panel(TITLES.get(key, key), key, [key]))
            used.update(panels[-1].keys)
        return panels

    def logged_once(self) -> list[str]:
        """Metrics with one logged step in a run of several (not plotted)."""
        if len({r["step"] for r in self.rows}) <= 1:
            return []
        return [k for k in self.ordered_keys() if len(self.series(k)[0]) == 1]

    def series(self, key: str) -> tuple[list[float], list[float]]:
        """(steps, values) sorted by step; a step logged twice (a resumed run)
        keeps its last value so the curve does not fold back on itself."""
        last: dict[float, float] = {}
        for r in self.rows:
            if key in r:
                last[r["step"]] = r[key]
        steps = sorted(last)
        return steps, [last[s] for s in steps]

    def final(self, key: str) -> tuple[float, float] | None:
        """(step, value) of the last line in file order that logs ``key``."""
        for r in reversed(self.rows):
            if key in r:
                return r["step"], r[key]
        return None


def best_direction(key: str) -> str | None:
    """'min'/'max' for held-out metrics where a best value means something."""
    if not key.startswith("eval/"):
        return None
    leaf = key.split("/", 1)[1]
    if "loss" in leaf or "perplexity" in leaf or leaf == "ppl":
        return "min"
    if "acc" in leaf or "margin" in leaf:
        return "max"
    return None


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def load_metrics(path: str) -> tuple[list[dict], set[str]]:
    rows, ignored = [], set()
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise ReportError(f"{path}:{lineno}: not valid JSON ({e.msg} at column {e.colno}); "
                                  'each line must be one object like {"step": 10, "train/loss": 2.31}') from None
            if not isinstance(obj, dict):
                raise ReportError(f"{path}:{lineno}: expected a JSON object, got {type(obj).__name__}")
            if not _is_number(obj.get("step")):
                raise ReportError(f'{path}:{lineno}: missing or non-numeric "step" (got {obj.get("step")!r}); '
                                  'every metrics line needs an integer "step" key')
            row = {"step": obj["step"]}
            for k, v in obj.items():
                if k == "step":
                    continue
                if _is_number(v):
                    row[k] = float(v)
                elif v is not None:  # null means "not logged this step", as if absent
                    ignored.add(k)
            rows.append(row)
    numeric = {k for r in rows for k in r}
    return rows, ignored - numeric


def find_stages(run_dir: str) -> list[Stage]:
    if not os.path.isdir(run_dir):
        raise ReportError(f"{run_dir}: not a directory; pass a pipeline run directory or one stage folder")
    if os.path.exists(os.path.join(run_dir, "metrics.jsonl")):
        dirs = [(os.path.basename(os.path.normpath(os.path.abspath(run_dir))), run_dir)]
    else:
        subs = sorted(d for d in os.listdir(run_dir) if os.path.isdir(os.path.join(run_dir, d)))
        dirs = [(d, os.path.join(run_dir, d)) for d in STAGE_ORDER if d in subs]
        dirs += [(d, os.path.join(run_dir, d)) for d in subs
                 if d not in STAGE_ORDER and os.path.exists(os.path.join(run_dir, d, "metrics.jsonl"))]
    if not dirs:
        raise ReportError(f"{run_dir}: no metrics.jsonl here nor in sft/, rm/ or ppo/ subfolders; "
                          "is this the run directory the pipeline wrote?")
    stages = []
    for name, path in dirs:
        st = Stage(name, path)
        mpath = os.path.join(path, "metrics.jsonl")
        if os.path.exists(mpath):
            st.rows, st.ignored = load_metrics(mpath)
        cpath = os.path.join(path, "config.yaml")
        if os.path.exists(cpath):
            with open(cpath, encoding="utf-8") as f:
                st.config_text = f.read()
        stages.append(st)
    return stages


def fmt(v: float) -> str:
    if math.isfinite(v) and v == int(v) and abs(v) < 1e15:
        return str(int(v))
    return f"{v:.6g}"


LINE_STYLES = ("-", "--", ":", "-.")
CURVE_COLORS = {"chosen": "tab:green", "rejected": "tab:red"}


def _curve_style(key: str, index: int, n: int) -> dict:
    """Training curves solid blue, held-out orange with markers; chosen/rejected green/red."""
    leaf = key.rpartition("/")[2]
    color = next((c for word, c in CURVE_COLORS.items() if leaf.startswith(word)), None)
    if color is None:
        color = "tab:orange" if key.startswith("eval/") else ("tab:blue" if n == 1 or key.startswith("train/") else f"C{index}")
    style = {"color": color, "linewidth": 1.5}
    if key.startswith("eval/") and color in CURVE_COLORS.values():
        style["linestyle"] = "--"
    return style


def plot_stage(stage: Stage, out_png: str, run_name: str) -> list[str]:
    """Draw one panel per metric or group of related metrics; returns the keys left out
    for lack of room."""
    try:
        import matplotlib
        matplotlib.use("Agg")  # headless: clusters and CI have no display
        import matplotlib.pyplot as plt
        from matplotlib.ticker import MaxNLocator, ScalarFormatter
    except ImportError:
        raise ReportError("matplotlib is required for `report`: pip install 'megatron-rlhf[report]' "
                          "(or pip install matplotlib)") from None
    panels = stage.panels()
    shown, hidden = panels[:MAX_PANELS], panels[MAX_PANELS:]
    left_out = [k for p in hidden for k in p.keys]
    ncols = min(NCOLS, max(1, len(shown)))
    all_steps = [r["step"] for r in stage.rows]
    # One x range for every panel, so curves line up by step and a metric logged
    # once is not drawn on an axis of its own making.
    pad = max(1.0, 0.02 * (max(all_steps) - min(all_steps)))
    xlim = (min(all_steps) - pad, max(all_steps) + pad)
    nrows = max(1, math.ceil(len(shown) / ncols))
    with plt.rc_context({"font.size": 11, "axes.titlesize": 12, "axes.labelsize": 11,
                         "xtick.labelsize": 10, "ytick.labelsize": 10}):
        fig, axes = plt.subplots(nrows, ncols, figsize=(5.2 * ncols, 3.6 * nrows + 0.6),
                                 squeeze=False, layout="constrained")
        for ax, panel in zip(axes.flat, shown):
            values_all = []
            for i, key in enumerate(panel.keys):
                steps, vals = stage.series(key)
                values_all += [v for v in vals if math.isfinite(v)]
                style = _curve_style(key, i, len(panel.keys))
                if len(steps) <= 40:
                    style.update(marker="o", markersize=3)
                label = line_label(key, panel.keys) if len(panel.keys) > 1 else None
                ax.plot(steps, vals, label=label, **style)
                direction = best_direction(key)
                finite = [(v, s) for s, v in zip(steps, vals) if math.isfinite(v)]
                if direction and finite:
                    v, s = (min if direction == "min" else max)(finite)
                    which = "best held-out" if len(panel.keys) > 1 else "best"
                    ax.plot([s], [v], marker="*", markersize=12, color="tab:red", linestyle="none",
                            label=f"{which} {fmt(v)} @ step {fmt(s)}")
            if values_all and max(values_all) == min(values_all):
                # a constant: say so instead of letting the axis invent a range around it
                v = values_all[0]
                half = abs(v) * 0.5 or 1.0
                ax.set_ylim(v - half, v + half)
                ax.text(0.5, 0.85, f"constant {fmt(v)}", transform=ax.transAxes, ha="center", fontsize=10,
                        bbox={"facecolor": "white", "edgecolor": "0.7", "boxstyle": "round"})
            if ax.get_legend_handles_labels()[0]:
                ax.legend(loc="best", fontsize=9)
            ax.set_title(panel.title)
            ax.set_xlabel("step")
            ax.set_xlim(*xlim)
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            ax.set_ylabel(panel.ylabel)
            ax.grid(True, alpha=0.3)
            # 3e-05 reads better than 0.00003 on a tick, and an offset ("+1.2e3" above the
            # axis) is easy to miss: plain values, scientific outside 1e-3..1e5
            formatter = ScalarFormatter(useOffset=False)
            formatter.set_powerlimits((-3, 5))
            ax.yaxis.set_major_formatter(formatter)
        for ax in list(axes.flat)[len(shown):]:
            ax.axis("off")
        if not shown:
            axes.flat[0].text(0.5, 0.5, "no numeric metrics logged", ha="center", va="center")
        fig.suptitle(f"{stage.name.upper()} stage — {run_name}", fontsize=15, fontweight="bold")
        fig.savefig(out_png, dpi=100)
        plt.close(fig)
    return left_out


def _fence(text: str) -> str:
    # A config containing ``` would close a 3-backtick fence early.
    ticks = "`" * max(3, max((len(r) for r in text.split("\n") if set(r) == {"`"}), default=0) + 1)
    return f"{ticks}yaml\n{text.rstrip()}\n{ticks}"


def stage_markdown(stage: Stage, png_name: str | None, left_out: list[str]) -> str:
    out = [f"## {stage.name.upper()} (`{stage.path}`)", ""]
    if not stage.rows:
        out += ["No metrics.jsonl (or it is empty): nothing to plot.", ""]
    else:
        steps = [r["step"] for r in stage.rows]
        out += [f"- steps: {len(set(steps))} distinct ({fmt(min(steps))} to {fmt(max(steps))}), "
                f"last logged step {fmt(steps[-1])}, {len(stage.rows)} metrics lines", ""]
        if png_name:
            out += [f"![{stage.name} metrics]({png_name})", ""]
        out += ["| metric | final | at step | best |", "|---|---|---|---|"]
        for key in stage.ordered_keys():
            step, val = stage.final(key)
            best = ""
            direction = best_direction(key)
            finite = [(r[key], r["step"]) for r in stage.rows if key in r and math.isfinite(r[key])]
            if direction and finite:
                v, s = (min if direction == "min" else max)(finite)
                best = f"{direction} {fmt(v)} @ step {fmt(s)}"
            out.append(f"| `{key}` | {fmt(val)} | {fmt(step)} | {best} |")
        out.append("")
        if left_out:
            out += [f"Not plotted (more than {MAX_PANELS} panels): " + ", ".join(f"`{k}`" for k in left_out), ""]
        once = stage.logged_once()
        if once:
            out += ["Logged at one step only (in the table, not plotted): " + ", ".join(f"`{k}`" for k in once), ""]
        if stage.ignored:
            out += ["Non-numeric keys (not plotted): " + ", ".join(f"`{k}`" for k in sorted(stage.ignored)), ""]
    out += ["### Config", ""]
    out += [_fence(stage.config_text) if stage.config_text is not None else "No config.yaml found.", ""]
    return "\n".join(out)


def make_report(run_dir: str, out_dir: str | None = None) -> tuple[str, list[str]]:
    """Write the PNGs and summary.md; returns (summary path, PNG paths)."""
    stages = find_stages(run_dir)
    out_dir = out_dir or os.path.join(run_dir, "report")
    os.makedirs(out_dir, exist_ok=True)
    run_name = os.path.basename(os.path.normpath(os.path.abspath(run_dir)))
    parts = [f"# Run report: {run_name}", "",
             f"Source: `{os.path.abspath(run_dir)}`. Final = last logged value; "
             "best = min loss / max accuracy or margin over eval steps.", ""]
    pngs = []
    for st in stages:
        png, left_out = None, []
        if st.rows:
            png = f"{st.name}.png"
            pngs.append(os.path.join(out_dir, png))
            left_out = plot_stage(st, pngs[-1], run_name)
        parts.append(stage_markdown(st, png, left_out))
    path = os.path.join(out_dir, "summary.md")
    with open(path, "w", encoding="utf-8") as f:
        f.write("\n".join(parts))
    return path, pngs


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="megatron-rlhf report",
                                description="Plot metrics.jsonl of each stage (sft, rm, ppo) and write summary.md.")
    p.add_argument("run_dir", metavar="RUN_DIR", help="pipeline run directory, or a single stage folder")
    p.add_argument("--out", metavar="DIR", help="output directory (default RUN_DIR/report)")
    args = p.parse_args(argv)
    try:
        path, pngs = make_report(args.run_dir, args.out)
    except (ReportError, OSError) as e:
        print(f"report: error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {path}" + "".join(f"\n      {p}" for p in pngs))
    return 0


if __name__ == "__main__":
    sys.exit(main())
