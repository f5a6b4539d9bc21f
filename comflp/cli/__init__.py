"""``comflp`` command line: ``comflp <command> [options]``; ``comflp <command> --help`` explains each.

The command-line layer: every command is a module here (``measure``, ``search``, ``report``, ``finetune``,
``average``, ``testset``, ``model``, ``aishell``) that parses its flags (the shared ones from ``options``),
builds the settings, calls the library's stage and prints the output path; the paper's top-level scripts
call the same functions.
"""

from __future__ import annotations

import importlib
import sys



# name -> ("module:function" taking argv, one-line summary); modules load lazily so --help is instant.
COMMANDS: dict[str, tuple[str, str]] = {
    "info": ("comflp.cli.model:info_main", "describe a model: family, layers, parameters, sizes (--json)"),
    "prune": ("comflp.cli.model:prune_main", "remove layers (--layers or a strategy file) and save an HF-format model"),
    "corpus": ("comflp.demo.corpus:main", "generate an embedded synthetic corpus: Mandarin, or English (--language en)"),
    "prepare-aishell": ("comflp.cli.aishell:main", "build Kaldi dirs from an official AISHELL-1 download"),
    "measure": ("comflp.cli.measure:main", "correlation matrices (dc, svcca, pwcca, cka, ...) from one pass, to .npz"),
    "search": ("comflp.cli.search:main", "coarse search on a matrix + fine search (CER) of the candidates"),
    "glp": ("comflp.cli.search:glp_main", "greedy layer pruning by CER (the slow baseline)"),
    "measure-report": ("comflp.cli.report:main", "which measure predicts the CER on this model: rank correlations, regret"),
    "finetune": ("comflp.cli.finetune:main", "fine-tune a pruned model (DDP via accelerate, optional distillation)"),
    "average": ("comflp.cli.average:main", "average fine-tuning checkpoints into an HF model"),
    "test": ("comflp.cli.testset:main", "decode a corpus: CER/WER, real-time factor, parameters"),
    "export": ("comflp.cli.export:main", "export to CTranslate2 (Whisper) or ONNX (CTC), checked against PyTorch"),
    "demo": ("comflp.demo.pipeline:main", "run the pipeline on the embedded default, as resumable stages"),
}


def _overview() -> str:
    width = max(map(len, COMMANDS))
    lines = [__doc__.strip().split("\n\n")[0], "", "commands:"]
    lines += [f"  {name:<{width}}  {summary}" for name, (_, summary) in COMMANDS.items()]
    lines += ["", "Every command uses the embedded demo model and corpus unless --model / --data_dir say otherwise."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_overview())
        return
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"error: unknown command {name!r}; one of: {', '.join(COMMANDS)}", file=sys.stderr)
        raise SystemExit(2)
    module, function = COMMANDS[name][0].split(":")
    from ..paths import outputs_in_working_dir
    from .argtypes import invoked_as

    with invoked_as(f"comflp {name}"), outputs_in_working_dir():
        getattr(importlib.import_module(module), function)(rest)


if __name__ == "__main__":
    main()
