"""Modules our dependencies import at start-up that Meadow never uses stay unimported until something reads them."""

import subprocess
import sys

# a fresh interpreter (this one imported everything long ago); a server imports no transformers, a client does, and
# transformers' object-detection losses import from scipy.optimize as they load
CHECK = """
import sys
import meadow.cli, meadow.server.server, meadow.server.handler, meadow.swarm
print(type(sys.modules["scipy.optimize"]).__name__)
import scipy.optimize
import meadow.client.model
print(type(sys.modules["scipy.optimize"]).__name__, scipy.optimize is sys.modules["scipy.optimize"])
print(round(scipy.optimize.linprog([1, 2], A_ub=[[-1, -1]], b_ub=[-1]).fun, 6))
from hivemind.averaging.load_balancing import load_balance_peers  # the code that imports it, at work
print(sum(load_balance_peers(100, [1.0, 3.0])))
"""


def test_scipy_optimize_is_imported_at_first_use_and_then_works_as_usual():
    """hivemind imports it (for its averaging, which Meadow does not use): 0.3 s of every server's start."""
    result = subprocess.run([sys.executable, "-c", CHECK], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.split("\n")[:4] == ["Deferred", "module True", "1.0", "100"], result.stdout
