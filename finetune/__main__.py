"""`python -m finetune recipe=NAME [overrides]` (or `accelerate launch -m finetune ...`)."""

from finetune.cli import main

if __name__ == "__main__":
    main()
