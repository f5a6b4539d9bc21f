"""Paper-compatible front-end: fine-tune a pruned model (optionally with distillation). See ``--help``."""

from comflp.cli.finetune import main

if __name__ == "__main__":
    main()
