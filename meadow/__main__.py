"""The `meadow` command (and `python -m meadow`): sets what OpenMP must read before torch loads, then runs the CLI."""

import os
import sys

# A client spends most of each token waiting for the swarm, and OpenMP's default makes torch's threads spin after each
# product meanwhile, on cores its servers may share. `benchmarks/client_wait.py` (one client beside its servers, 2
# cores): waiting passively, the client took 36% less CPU per token and generated 5-10% faster. A server keeps the
# default: its threads soon have the next step's products to run. `meadow bench` runs clients too, and its local run,
# which it compares them with, under the same setting.
CLIENT_COMMANDS = ("generate", "chat", "api", "demo", "bench")


def command_name(argv: list[str]) -> str | None:
    """The command `argv` (without the program) names: its first word that is not an option, like `-v`."""
    return next((arg for arg in argv if not arg.startswith("-")), None)


def run() -> None:
    if command_name(sys.argv[1:]) in CLIENT_COMMANDS:
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # a user's own setting wins
    from meadow.cli import command_line  # imports torch, which loads OpenMP

    command_line()


if __name__ == "__main__":
    run()
