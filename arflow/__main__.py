"""`python -m arflow` (also `torchrun -m arflow` and `deepspeed --module arflow`): the command."""

from arflow.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
