"""`python -m gptlab` is the same as the `gptlab` command (torchrun launches it this way)."""

from gptlab.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
