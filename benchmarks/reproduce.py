"""Re-run every table of issue 16's section in benchmarks/RESULTS.md at the current commit, from one script.

    .venv/bin/python benchmarks/reproduce.py                        # all five targets: ~80 min on a 2-core CPU
    .venv/bin/python benchmarks/reproduce.py --targets memory scaling
    .venv/bin/python benchmarks/reproduce.py --dry-run              # print the commands only

Each target runs its benchmark script(s) in fresh processes, one after another (nothing else should
run on the machine meanwhile: on 2 cores a competing process makes torch 3-5x slower). Each result
goes to `benchmarks/results/targets/<name>.json`; then the commit, the date, the CPU's flags, every
command, every table and a verdict per target computed from the numbers go to
`benchmarks/results/targets.md` and between the `<!-- reproduce.py -->` markers of RESULTS.md.
A target not re-run keeps its last table (with the commit it was run at).
"""

from __future__ import annotations

import argparse
import datetime
import json
import shlex
import subprocess
import sys

import report

BENCHMARKS, REPO = report.BENCHMARKS, report.REPO
RESULTS = BENCHMARKS / "results" / "targets"
MARKERS = ("<!-- reproduce.py: begin -->", "<!-- reproduce.py: end -->")


def commands(python: str) -> dict[str, list[tuple[str, list[str]]]]:
    """Per target: (result name, command) pairs, run in order."""
    bench = f"{python} benchmarks"
    out = "benchmarks/results/targets"
    return {
        "vs_trl": [
            (f"vs_trl_{n}", f"{bench}/bench_vs_trl.py --num-prompts {n} --output {out}/vs_trl_{n}.json".split())
            for n in (64, 512)
        ],
        "generation": [
            (
                "generation",
                f"{bench}/bench_generation.py --num-prompts 64 --batch-sizes 16 64 --max-new-tokens 96 --dtypes auto "
                f"--output {out}/generation.json".split(),
            ),
        ],
        "memory": [
            (
                f"main_command_{name}",
                [
                    *f"{bench}/bench_memory.py --trace-fit runs/reproduce/main_command_{name}".split(),
                    *f"--output {out}/main_command_{name}.json --fit-args".split(),
                    *fit_args,
                ],
            )
            for name, fit_args in (
                ("config", []),
                ("batch8", ["--data.batch_size", "8", "--trainer.accumulate_grad_batches", "1"]),
            )
        ],
        "vllm": [("gpu_check", ["bash", "scripts/gpu_check.sh"])],
        "scaling": [
            (
                "scaling_prompts",
                f"{bench}/bench_scaling.py --num-prompts 64 256 1024 --max-new-tokens 32 "
                f"--output {out}/scaling_prompts.json".split(),
            ),
            (
                "scaling_iterations",
                f"{bench}/bench_scaling.py --num-prompts 64 --iterations 3 --max-new-tokens 32 "
                f"--output {out}/scaling_iterations.json".split(),
            ),
        ],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    targets = list(commands(sys.executable))
    parser.add_argument("--targets", nargs="+", default=targets, choices=targets)
    parser.add_argument("--dry-run", action="store_true", help="print the commands, run nothing")
    args = parser.parse_args()
    plan = commands(sys.executable)
    RESULTS.mkdir(parents=True, exist_ok=True)
    for target in args.targets:
        for name, command in plan[target]:
            print(f"[reproduce] {target}: {shlex.join(command)}", flush=True)
            if args.dry_run:
                continue
            if target == "vllm" and not cuda_available():
                write_json(name, {"skipped": "no CUDA device visible to torch on this machine"}, command)
                continue
            started = datetime.datetime.now(datetime.timezone.utc)
            log = RESULTS / f"{name}.log"
            with open(log, "w") as handle:
                rc = subprocess.run(command, cwd=REPO, stdout=handle, stderr=subprocess.STDOUT).returncode
            if rc != 0:
                sys.exit(f"[reproduce] {name} failed with exit code {rc}; see {log}")
            if target == "vllm":
                summary = (REPO / "gpu_check" / "summary.txt").read_text()
                write_json(name, {"markdown": "```\n" + summary + "```"}, command)
            stamp(name, command, started)
    if not args.dry_run:
        write_report()


def cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def write_json(name: str, results: dict, command: list[str]) -> None:
    (RESULTS / f"{name}.json").write_text(json.dumps(results, indent=1))
    stamp(name, command, datetime.datetime.now(datetime.timezone.utc))


def stamp(name: str, command: list[str], started: datetime.datetime) -> None:
    """Record in the result the commit, the time and the command that produced it."""
    path = RESULTS / f"{name}.json"
    results = json.loads(path.read_text())
    results["reproduce"] = {
        "commit": code_commit(),
        "started": started.isoformat(timespec="seconds"),
        "command": shlex.join(["python", *command[1:]] if command[0] == sys.executable else command),
        "cpu_flags": report.cpu_flags_text(),
    }
    path.write_text(json.dumps(results, indent=1))


def code_commit() -> str:
    """HEAD, marked when the code that runs (the package, the configs, the benchmark scripts) has
    uncommitted changes; results and RESULTS.md being written meanwhile do not count."""
    changed = git("status", "--porcelain", "--untracked-files=no", "--", "lowrank_spin", "configs", "benchmarks/*.py")
    return git("rev-parse", "--short", "HEAD") + ("+uncommitted changes" if changed else "")


def git(*args: str) -> str:
    return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True).stdout.strip()


# ---- the report --------------------------------------------------------------------------------------


def load(name: str) -> dict | None:
    path = RESULTS / f"{name}.json"
    return json.loads(path.read_text()) if path.exists() else None


def verdicts() -> dict[str, str]:
    """One line per target, computed from the results on disk."""
    lines = {}
    trl = [r for r in (load("vs_trl_64"), load("vs_trl_512")) if r]
    if trl:
        ratios = ", ".join(
            f"{r['settings']['num_prompts']} prompts {r['ratio_trl_over_ours']['total_s']:.2f}x" for r in trl
        )
        met = all(r["ratio_trl_over_ours"]["total_s"] >= 3 for r in trl) and len(trl) == 2
        lines["vs_trl"] = (
            f"TRL / ours, total wall: {ratios} (target >= 3x at 64 and 512: {'met' if met else 'not met'})"
        )
    if gen := load("generation"):
        by_batch = {r["batch_size"]: r["tokens_per_s"] for r in gen["rows"]}
        lines["generation"] = "HF `generate`, new tokens/s: " + ", ".join(
            f"batch {b}: {t:.1f}" for b, t in sorted(by_batch.items())
        )
        if 16 in by_batch and 64 in by_batch:
            lines["generation"] += f" (batch 64: {by_batch[64] / by_batch[16]:.2f}x batch 16)"
    memory = {name: load(f"main_command_{name}") for name in ("config", "batch8")}
    if mine := memory["config"]:
        peak = mine["phases"]["ru_maxrss_gb"]
        lines["memory"] = (
            f"the main command's peak RSS: {peak:.2f} GB (target <= 2.5 GB: {'met' if peak <= 2.5 else 'not met'})"
        )
        if old := memory["batch8"]:
            lines["memory"] += (
                f"; with the whole batch of 8 in one step: {old['phases']['ru_maxrss_gb']:.2f} GB; wall "
                f"{mine['phases']['wall_s']:.0f} s vs {old['phases']['wall_s']:.0f} s"
            )
    if gpu := load("gpu_check"):
        lines["vllm"] = gpu.get("skipped") or "ran: see the GPU check's summary below"
    if scaling := load("scaling_prompts"):
        runs = scaling["runs"]
        lo, hi = runs[0], runs[-1]
        per_prompt = hi["work_s_per_prompt_iteration"] / lo["work_s_per_prompt_iteration"]
        peaks = [r["peak_rss_gb"] for r in runs]
        lines["scaling"] = (
            f"{hi['num_prompts'] // lo['num_prompts']}x the prompts: {hi['work_s'] / lo['work_s']:.1f}x the time after "
            f"load (seconds per prompt x{per_prompt:.2f}); peak RSS {min(peaks):.2f}-{max(peaks):.2f} GB"
        )
        if its := load("scaling_iterations"):
            sampled = [i["sampled_max_rss_gb"] for i in its["runs"][0]["iterations"]]
            lines["scaling"] += (
                "; per-iteration max RSS over 3 iterations: " + " / ".join(f"{s:.2f}" for s in sampled) + " GB"
            )
    return lines


TITLES = {
    "vs_trl": "1. One SPIN iteration vs HF `generate` + TRL `DPOTrainer` (target: >= 3x, 64 and 512 prompts)",
    "generation": "2. Generation vs HF `generate` at batch 16 (target: >= 2x)",
    "memory": "3. Peak RSS of the README's main command (target: <= 2.5 GB, no loss of speed)",
    "vllm": "4. vLLM vs HF `generate` on a GPU",
    "scaling": "5. Scaling with the number of prompts and across iterations",
}


def write_report() -> None:
    lines = [
        MARKERS[0],
        f"_Written by `benchmarks/reproduce.py` on {datetime.date.today().isoformat()}; CPU flags of this machine: "
        f"{report.cpu_flags_text()}._",
        "",
    ]
    found = verdicts()
    plan = commands("python")
    for target, title in TITLES.items():
        lines += [f"#### {title}", "", f"**{found.get(target, 'not run yet')}**", ""]
        for name, _ in plan[target]:
            if (results := load(name)) is None or "skipped" in results:
                continue
            meta = results.get("reproduce", {})
            lines += [
                f"`{meta.get('command', '?')}` (commit {meta.get('commit', '?')}, {meta.get('started', '?')}, "
                f"CPU flags {meta.get('cpu_flags', '?')})",
                "",
                results["markdown"].strip(),
                "",
            ]
    lines.append(MARKERS[1])
    block = "\n".join(lines)
    (BENCHMARKS / "results" / "targets.md").write_text(block + "\n")
    path = BENCHMARKS / "RESULTS.md"
    text = path.read_text()
    begin, end = text.find(MARKERS[0]), text.find(MARKERS[1])
    if begin < 0 or end < 0:
        sys.exit(f"[reproduce] {path} has no {MARKERS[0]} ... {MARKERS[1]} block; tables written to targets.md only")
    path.write_text(text[:begin] + block + text[end + len(MARKERS[1]) :])
    print(f"[reproduce] tables written to {path} and benchmarks/results/targets.md")


if __name__ == "__main__":
    main()
