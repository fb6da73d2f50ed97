"""`epa-demo`: the known-reward experiment, DPO against EPA, end to end.

    epa-demo                                   # defaults: 5 methods x 3 seeds (about 3 min on 2 CPU cores)
    epa-demo --seeds 0 --methods dpo epa_k3_m4 --steps 100     # a quicker look
    epa-demo --sweep negatives                 # the sweeps: convergence, negatives, practical (sweep.py)

1. The task and its reference policy (``task``): one tiny Llama trained by SFT on the broad base
   answer distribution, shared by every run, and held-out prompts with candidate answers sampled
   from it.
2. For each seed: preference data from the reference's samples (``task.write_preferences``),
   then each method trained on it by ``epa_ext.train`` with the same steps, batch, β and
   learning rate.
3. Each trained policy evaluated on the held-out prompts (``metrics``); a table of mean ± std over
   seeds, results.json, and plots: true reward against KL with the best reachable frontier, the
   slope-1 metrics per method, implicit against true reward.

A call that is killed keeps what it finished (``pipeline``): the reference, each seed's data and
each trained and evaluated run are reused by the next call with the same settings.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from .config import ExperimentConfig, add_config_flags, config_from_flags
from .pipeline import run_settings, write_json
from .report import compare_with_dpo, format_table
from .sweep import SWEEPS, method_settings, run_sweep, sweep_defaults


def run_experiment(cfg: ExperimentConfig) -> dict:
    """cfg.methods x cfg.seeds; returns (and writes to output_dir/results.json) the results."""
    cfg.validate()
    results = run_settings(cfg, method_settings(cfg))
    write_json(Path(cfg.output_dir) / "results.json", results)
    return results


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="epa-demo", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    defaults = "; ".join(f"{name}: " + ", ".join(f"--{key.replace('_', '-')} "
                                                   f"{' '.join(map(str, v)) if isinstance(v, list) else v}"
                                                   for key, v in sweep.defaults.items())
                         for name, sweep in SWEEPS.items())
    parser.add_argument("--sweep", choices=list(SWEEPS), default=None,
                        help=f"run a sweep instead of the default experiment (sweep.py), with its own defaults "
                             f"where they differ from the ones below (flags given here win), --output-dir "
                             f"epa-demo-sweep-NAME. {defaults}")
    add_config_flags(parser)
    return parser


def main(argv: list[str] | None = None) -> None:
    given = vars(build_parser().parse_args(argv))
    sweep = given.pop("sweep")
    try:
        cfg = config_from_flags(given, sweep_defaults(sweep) if sweep else None)
        if sweep:
            results, paths = run_sweep(sweep, cfg)
        else:
            results = run_experiment(cfg)
            from .plots import plot_results

            paths = [Path(cfg.output_dir) / "results.json", *plot_results(results, Path(cfg.output_dir))]
    except ValueError as error:
        raise SystemExit(f"epa-demo: {error}") from None
    print("\n" + format_table(results))
    for line in compare_with_dpo(results):
        print(line)
    print(f"\n{results['seconds']:.0f} s on {results['device']}.")
    for path in paths:
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
