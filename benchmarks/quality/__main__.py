"""`python -m benchmarks.quality`: every pipeline on the hand-made data set, scored.

Prints one table per pipeline and model (rates of valid, consistent, grounded, covering and
clean outputs, by language, with wall seconds per ticket), the retrieval table and a summary
per model. By default it runs the cases marked quick (every pipeline, both languages; minutes
on an idle two-core machine); `--all` runs every case, `--case ID` chosen ones. `--model PATH`
(repeatable) compares GGUF files; the default is the configured model (`TF_MODEL_PATH`, else
SmolLM2-135M). See BENCHMARKS.md for what each rate means.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

from benchmarks.harness import run_with_servers
from benchmarks.quality import report
from benchmarks.quality.dataset import load_cases
from benchmarks.quality.runner import Evaluation, TicketResult, result_from_json
from inference.backends import smollm2_model_path
from ticketflow.embedded import EmbeddedServers
from ticketflow.settings import Settings


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.quality", description=__doc__)
    scope = parser.add_mutually_exclusive_group()
    scope.add_argument("--quick", action="store_true", help="the cases marked quick (default)")
    scope.add_argument("--all", action="store_true", help="every case (tens of minutes)")
    parser.add_argument("--case", action="append", default=[], help="only this case (repeatable)")
    parser.add_argument("--pipeline", action="append", default=[], help="only this pipeline")
    parser.add_argument("--model", action="append", type=Path, default=[], help="a GGUF file")
    parser.add_argument("--json", type=Path, help="write every check and output to this file")
    parser.add_argument("--verbose", action="store_true", help="list the checks that failed")
    parser.add_argument("--report", type=Path, help="print the tables of a --json file and stop")
    args = parser.parse_args(argv)
    if args.report:
        saved = json.loads(args.report.read_text("utf-8"))
        print_tables(
            {model: [result_from_json(r) for r in items] for model, items in saved.items()},
            verbose=args.verbose,
        )
        return 0

    settings = Settings()
    models = args.model or [settings.model_path or smollm2_model_path()]
    cases = [
        case
        for case in load_cases()
        if (args.all or args.case or case.quick)
        and (not args.case or case.id in args.case)
        and (not args.pipeline or case.pipeline in args.pipeline)
    ]
    skipped = [case.id for case in cases if not case.available()]
    cases = [case for case in cases if case.available()]
    if skipped:
        print(f"skipped (sample files not found): {', '.join(skipped)}")
    if not cases:
        print("no cases to run", file=sys.stderr)
        return 2
    by_model: dict[str, list[TicketResult]] = {}
    done: list[TicketResult] = []

    def save(result: TicketResult) -> None:
        # Written after every ticket, so a long run that is stopped keeps what it measured.
        done.append(result)
        if args.json:
            dump: dict[str, list[dict[str, object]]] = {}
            for item in done:
                dump.setdefault(item.model, []).append(item.as_json())
            args.json.write_text(json.dumps(dump, ensure_ascii=False, indent=1), "utf-8")

    async def body(servers: EmbeddedServers) -> None:
        run_settings = settings.model_copy(update={"database_url": servers.database_url})
        async with Evaluation(run_settings, servers.database_url) as evaluation:
            for model in models:
                print(f"model {model.name}: {len(cases)} cases", flush=True)
                results = await evaluation.run_model(model, cases, on_result=save)
                by_model[results[0].model if results else model.stem] = results

    started = time.perf_counter()
    run_with_servers("tf-quality-", body)
    print()
    print(
        f"machine: {platform.machine()}, Python {platform.python_version()}, "
        f"threads {settings.inference_threads or 'all'}; {time.perf_counter() - started:.0f}s"
    )
    print_tables(by_model, verbose=args.verbose)
    return 0


def print_tables(by_model: dict[str, list[TicketResult]], *, verbose: bool) -> None:
    for model, results in by_model.items():
        for pipeline in sorted({r.pipeline for r in results}):
            group = [r for r in results if r.pipeline == pipeline]
            print()
            print(report.pipeline_table(pipeline, model, group))
            if verbose:
                for result in group:
                    lines = report.failed_checks(result)
                    if lines:
                        print(f"  {result.case}:")
                        print("\n".join(lines))
    first = next(iter(by_model.values()))
    print()
    print(report.retrieval_table(first))
    print()
    print(report.summary_table(by_model))


if __name__ == "__main__":
    raise SystemExit(main())
