"""Turn the JSON that ``run_gpu.sh`` writes into the Markdown tables of ``RESULTS.md``, each figure against its target.

    python benchmarks/record_results.py benchmarks/out              # every table
    python benchmarks/record_results.py benchmarks/out --only e2e   # one kind: micro, estimate, e2e
    python benchmarks/record_results.py benchmarks/out --headline   # the headline table of RESULTS.md (+ headline.json)

Where ``ours`` misses a target and both it and the ceiling were profiled (``--profile``), the device time per step of
each kind of kernel is printed for both with the difference: the measured cause of the gap.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _shapes import layer_widths  # noqa: E402

SIZES = ("1b", "8b")  # the shapes with a memory target
RANK = 16


def memory_budget_gib(size: str, batch: int, seq: int) -> float:
    """What LoRA may add to the ceiling: a bf16 copy of each distinct adapted input, plus adapter weights, grads, AdamW.

    Per layer the adapted inputs are the q/k/v input and the gate/up input (hidden each, shared), the o input (hidden)
    and the down input (intermediate).
    """
    n, h, i, kv = layer_widths(size)
    inputs = n * (3 * h + i) * batch * seq * 2
    # A: r x in, B: out x r for q, k, v, o, gate, up, down; fp32 weight + grad + 2 AdamW moments = 16 bytes each
    per_layer = RANK * ((h + h) + (h + kv) * 2 + (h + h) + (h + i) * 2 + (i + h))
    return (inputs + n * per_layer * 16) / 2**30


def micro(rows: list[dict]) -> None:
    print("### `bench_fused_lora.py`: forward + backward of one projection, bf16\n")
    print("| shape (tokens x in -> out) | r | case | ms | overhead vs frozen base | target | saved for bwd MiB |")
    print("|---|---|---|---|---|---|---|")
    for row in rows:
        target = ""
        if row["case"] == "fused" and row["r"] == 16 and row["shape"].split("x", 1)[1] in ("4096->4096", "4096->14336"):
            target = "<= 10%: " + ("met" if row["overhead_pct"] <= 10 else "MISSED")
        over = "" if row["overhead_pct"] is None else f"{row['overhead_pct']:+.1f}%"
        print(f"| {row['shape']} | {row['r']} | {row['case']} | {row['ms']:.3f} | {over} | {target} | "
              f"{row['saved_mib']:.1f} |")  # fmt: skip
    profiled = [r for r in rows if r.get("profile_by_kind")]
    if profiled:
        print("\nDevice time by kind of kernel (ms per forward + backward):\n")
        for row in profiled:
            kinds = ", ".join(f"{k} {v:.3f}" for k, v in row["profile_by_kind"].items())
            print(f"- {row['shape']} {row['case']}: {kinds}")
    print()


def estimate(rows: list[dict]) -> None:
    print("### `estimate_vs_measured.py`: memory estimator against `max_memory_allocated`\n")
    print("| variant | part | estimate GiB | measured GiB | ratio | within 15% |")
    print("|---|---|---|---|---|---|")
    for row in rows:
        for part in ("static", "activations", "total"):
            est, meas = row[f"estimate_{part}"] / 2**30, row[f"measured_{part}"] / 2**30
            ok = "yes" if abs(est / meas - 1) <= 0.15 else "NO"
            print(f"| {row['variant']} | {part} | {est:.2f} | {meas:.2f} | {est / meas:.3f} | {ok} |")
    print()


def e2e(run: dict) -> None:
    results = [r for r in run["results"] if "tok_s" in r]
    by_mode = {r["mode"]: r for r in results}
    ceiling = by_mode.get("ceiling_liger") or by_mode.get("ceiling")
    title = f"{run['size']} shape, {run['quant']}, {run['batch']} x {run['seq']} tokens"
    print(f"### `bench_lora_e2e.py`: {title} ({run['device']}, torch {run['torch']}, {run['date']})\n")
    budget = None
    if ceiling and ceiling.get("peak_gib") is not None and run["size"] in SIZES:
        budget = ceiling["peak_gib"] + memory_budget_gib(run["size"], run["batch"], run["seq"])
    print("| mode | tokens/s | % of ceiling | peak GiB | trainable | loss |")
    print("|---|---|---|---|---|---|")
    for r in run["results"]:
        if "error" in r:
            print(f"| {r['mode']} | failed: {' '.join(r['error'])[:160]} | | | | |")
            continue
        pct = f"{100 * r['tok_s'] / ceiling['tok_s']:.0f}%" if ceiling else "-"
        peak = "-" if r.get("peak_gib") is None else f"{r['peak_gib']:.1f}"
        print(f"| {r['mode']} | {r['tok_s']:,} | {pct} | {peak} | {r['n_train']:,} | {r['loss']:.3f} |")
    ours = by_mode.get("ours") or by_mode.get("ours_dora")
    if ours and ceiling:
        ratio = ours["tok_s"] / ceiling["tok_s"]
        verdict = "met" if ratio >= 0.9 else "MISSED"
        print(f"\nThroughput: {ours['mode']} = {100 * ratio:.1f}% of {ceiling['mode']} (target >= 90%: {verdict}).")
        if budget is not None and ours.get("peak_gib") is not None:
            verdict = "met" if ours["peak_gib"] <= budget else "MISSED"
            print(
                f"Memory: ours {ours['peak_gib']:.1f} GiB, budget {budget:.1f} GiB = ceiling {ceiling['peak_gib']:.1f} "
                f"+ adapted inputs and adapter state (target: {verdict})."
            )
        peft = by_mode.get("peft") or by_mode.get("peft_dora")
        if peft:
            memory = f", {ours['peak_gib'] / peft['peak_gib']:.2f}x memory" if peft.get("peak_gib") else ""
            print(f"Against HF PEFT: {ours['tok_s'] / peft['tok_s']:.2f}x tokens/s{memory}.")
        gap(ours, ceiling)
        if ours.get("matmul_choices"):
            print("\nBack ends `auto` chose (`lowrank_matmul`, `dual_lowrank`):\n")
            for product, choice in sorted(ours["matmul_choices"].items()):
                print(f"- {product}: {choice}")
    print()


def gap(ours: dict, ceiling: dict) -> None:
    a, b = ours.get("profile_by_kind"), ceiling.get("profile_by_kind")
    if not a or not b:
        return
    print(f"\nDevice time per step by kind of kernel, ms (ours vs {ceiling['mode']}):\n")
    print("| kind | ours | ceiling | difference |")
    print("|---|---|---|---|")
    for kind in sorted(set(a) | set(b), key=lambda k: -(a.get(k, 0) - b.get(k, 0))):
        x, y = a.get(kind, 0.0), b.get(kind, 0.0)
        print(f"| {kind} | {x:.2f} | {y:.2f} | {x - y:+.2f} |")
    print(f"| total | {sum(a.values()):.2f} | {sum(b.values()):.2f} | {sum(a.values()) - sum(b.values()):+.2f} |")


def parity_tests(folder: str) -> dict | None:
    """Counts from the JUnit XML the quick plan's pytest run writes (``quick-tests.xml``)."""
    path = os.path.join(folder, "quick-tests.xml")
    if not os.path.exists(path):
        return None
    import xml.etree.ElementTree as ET

    suite = ET.parse(path).getroot()
    suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
    counts = {key: int(suite.get(key, 0)) for key in ("tests", "failures", "errors", "skipped")}
    counts["passed"] = counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]
    return counts


def headline(folder: str) -> list[dict]:
    """The headline rows (RESULTS.md's GPU table) from whatever the folder holds; a missing run says so."""
    rows: list[dict] = []
    micro_path = os.path.join(folder, "micro.jsonl")
    micro_rows = [json.loads(line) for line in open(micro_path) if line.strip()] if os.path.exists(micro_path) else []
    for shape in ("4096->4096", "4096->14336"):
        hit = [r for r in micro_rows if r["case"] == "fused" and r["r"] == RANK and r["shape"].endswith("x" + shape)]
        figure = f"{hit[0]['overhead_pct']:+.1f}% ({hit[0]['ms']:.3f} ms)" if hit else "not run"
        verdict = ("met" if hit[0]["overhead_pct"] <= 10 else "MISSED") if hit else "-"
        rows.append(dict(benchmark="bench_fused_lora.py", shape=f"8192 tokens, r=16, {shape.replace('->', 'x')}",
                         target="overhead <= 10% vs frozen F.linear", figure=figure, verdict=verdict))  # fmt: skip
    for size, tokens in (("1b", "4 x 2048"), ("8b", "2 x 2048")):
        path = os.path.join(folder, f"e2e-{size}.json")
        run = json.load(open(path)) if os.path.exists(path) else {"results": []}
        by_mode = {r["mode"]: r for r in run["results"] if "tok_s" in r}
        ceiling = by_mode.get("ceiling_liger") or by_mode.get("ceiling")
        ours, peft = by_mode.get("ours"), by_mode.get("peft")
        shape = f"{size.upper()} shape, {tokens}, bf16"
        if ours and ceiling:
            ratio = ours["tok_s"] / ceiling["tok_s"]
            figure = f"{ours['tok_s']:,} tok/s = {100 * ratio:.1f}% of {ceiling['mode']} ({ceiling['tok_s']:,})"
            rows.append(dict(benchmark="bench_lora_e2e.py", shape=shape, target=">= 90% of the ceiling's tokens/s",
                             figure=figure, verdict="met" if ratio >= 0.9 else "MISSED"))  # fmt: skip
            budget = ceiling["peak_gib"] + memory_budget_gib(size, run["batch"], run["seq"])
            rows.append(dict(benchmark="bench_lora_e2e.py", shape=shape, target=f"peak <= {budget:.1f} GiB (ceiling "
                             f"{ceiling['peak_gib']:.1f} + adapted inputs and adapter state)",
                             figure=f"{ours['peak_gib']:.1f} GiB",
                             verdict="met" if ours["peak_gib"] <= budget else "MISSED"))  # fmt: skip
        else:
            missing = ", ".join(m for m, r in (("ours", ours), ("ceiling", ceiling)) if r is None)
            rows.append(dict(benchmark="bench_lora_e2e.py", shape=shape, target=">= 90% of the ceiling; memory budget",
                             figure=f"not run ({missing} missing)", verdict="-"))  # fmt: skip
        if ours and peft:
            rows.append(dict(benchmark="bench_lora_e2e.py", shape=shape, target="against HF PEFT (no target)",
                             figure=f"{ours['tok_s'] / peft['tok_s']:.2f}x tokens/s, "
                             f"{ours['peak_gib'] / peft['peak_gib']:.2f}x memory ({peft['tok_s']:,} tok/s, "
                             f"{peft['peak_gib']:.1f} GiB)", verdict="-"))  # fmt: skip
    tests = parity_tests(folder)
    figure = "not run" if tests is None else f"{tests['passed']} passed, {tests['failures'] + tests['errors']} failed"
    verdict = "-" if tests is None else ("met" if tests["failures"] + tests["errors"] == 0 else "MISSED")
    rows.append(dict(benchmark="tests/kernels/test_fused_kernels_gpu.py", shape="real shapes, main kernels",
                     target="every parity test passes", figure=figure, verdict=verdict))  # fmt: skip
    return rows


def print_headline(folder: str) -> int:
    """Print the headline table, write ``headline.json``; return how many rows were not run."""
    rows = headline(folder)
    print("| benchmark | shape | target | figure | verdict |")
    print("|---|---|---|---|---|")
    for row in rows:
        print(f"| `{row['benchmark']}` | {row['shape']} | {row['target']} | {row['figure']} | {row['verdict']} |")
    with open(os.path.join(folder, "headline.json"), "w") as f:
        json.dump(rows, f, indent=1)
    return sum(row["figure"].startswith("not run") for row in rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder")
    parser.add_argument("--only", choices=["micro", "estimate", "e2e"])
    parser.add_argument("--headline", action="store_true", help="only the headline table; also writes headline.json")
    args = parser.parse_args()
    if args.headline:
        sys.exit(1 if print_headline(args.folder) else 0)
    env = os.path.join(args.folder, "env.txt")
    if os.path.exists(env) and args.only is None:
        print("Environment: " + "; ".join(open(env).read().split("\n")).strip("; ") + "\n")
    if args.only in (None, "micro") and os.path.exists(path := os.path.join(args.folder, "micro.jsonl")):
        micro([json.loads(line) for line in open(path) if line.strip()])
    if args.only in (None, "estimate") and os.path.exists(path := os.path.join(args.folder, "estimate.jsonl")):
        estimate([json.loads(line) for line in open(path) if line.strip()])
    if args.only in (None, "e2e"):
        for path in sorted(glob.glob(os.path.join(args.folder, "e2e-*.json"))):
            e2e(json.load(open(path)))


if __name__ == "__main__":
    main()
