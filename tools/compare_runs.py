"""Compare training runs from their --metrics-file JSONL: per-step table, validation losses,
a markdown report and a loss-curve PNG.

    python tools/compare_runs.py baseline=runs/baseline.jsonl kha=runs/kha.jsonl \
        [--every 10] [--markdown docs/results/x.md] [--plot docs/results/x.png] [--title ...]
"""
import argparse
import json
import os
import sys
import warnings

warnings.filterwarnings("ignore")  # importing the package imports Megatron-Core, which warns about apex/TE
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_kha.observe.lineplot import write_line_plot_png  # noqa: E402


def read_run(path: str):
    train, valid, tokens_per_s = {}, {}, []
    for line in open(path):
        record = json.loads(line)
        if "lm_loss" in record:
            train[record["iteration"]] = record["lm_loss"]
            tokens_per_s.append(record.get("tokens_per_s", 0.0))
        if "valid_lm_loss" in record:
            valid[record["iteration"]] = record["valid_lm_loss"]
    return train, valid, (sum(tokens_per_s[1:]) / max(1, len(tokens_per_s) - 1)) if tokens_per_s else 0.0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", help="NAME=METRICS.jsonl")
    p.add_argument("--every", type=int, default=1, help="print every N-th step")
    p.add_argument("--markdown", default=None)
    p.add_argument("--plot", default=None)
    p.add_argument("--title", default="Training loss")
    args = p.parse_args(argv)
    runs = {}
    for spec in args.runs:
        name, sep, path = spec.partition("=")
        if not sep or not os.path.isfile(path):
            p.error(f"argument runs: {spec!r} must be NAME=PATH of an existing metrics file")
        runs[name] = read_run(path)
    names = list(runs)
    steps = sorted(set().union(*(r[0] for r in runs.values())))
    print(f"{'step':>6} " + " ".join(f"{n:>12}" for n in names))
    for step in steps:
        if step % args.every == 0 or step == 1 or step == steps[-1]:
            print(f"{step:6d} " + " ".join(f"{runs[n][0].get(step, float('nan')):12.4f}" for n in names))
    final = {n: (max(r[1]) if r[1] else None) for n, r in runs.items()}
    print("\nvalidation loss: " + " | ".join(
        f"{n} {runs[n][1][final[n]]:.4f} (iter {final[n]})" if final[n] else f"{n} n/a" for n in names))
    legend = write_line_plot_png({n: sorted(r[0].items()) for n, r in runs.items()}, args.plot) if args.plot else {}
    if args.markdown:
        lines = [f"## {args.title}", "", "| run | final train loss | last validation loss | tokens/s | curve colour |",
                 "|---|---|---|---|---|"]
        for n, (train, valid, tps) in runs.items():
            last = train[max(train)] if train else float("nan")
            val = f"{valid[final[n]]:.4f} (iter {final[n]})" if final[n] else "n/a"
            lines.append(f"| {n} | {last:.4f} | {val} | {tps:.0f} | {legend.get(n, '')} |")
        if args.plot:
            losses = [v for r in runs.values() for v in r[0].values()]
            lines += ["", f"![loss curves]({os.path.basename(args.plot)})", "",
                      f"Plot: x = iteration ({steps[0]}..{steps[-1]}), y = training loss "
                      f"({min(losses):.3f}..{max(losses):.3f}); colours as in the table."]
        os.makedirs(os.path.dirname(os.path.abspath(args.markdown)), exist_ok=True)
        with open(args.markdown, "w") as f:
            f.write("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
