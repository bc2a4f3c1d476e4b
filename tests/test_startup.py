"""What importing meadow changes in its dependencies' start-up (startup.py): modules they import that Meadow never
uses stay unimported until something reads them, and hivemind's futures share without a manager process."""

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


DHT_CALLS = """
import os, psutil
import meadow
from hivemind.utils import get_dht_time
from meadow.swarm.dht import start_dht

dht = start_dht()
def open_files():
    return len(os.listdir("/proc/self/fd"))
for _ in range(20):  # warm: p2pd's and hivemind's own files are open
    dht.get("warm")
before = open_files()
for i in range(200):  # each call's future shares its state byte with the DHT's process
    assert dht.store(f"key{i}", i, get_dht_time() + 60)
    assert dht.get(f"key{i}", latest=True).value == i
print(open_files() - before, sorted({child.name() for child in psutil.Process().children(recursive=True)}))
dht.shutdown()
"""


def test_dht_calls_share_through_file_descriptors_with_no_manager_process_and_no_leak():
    result = subprocess.run([sys.executable, "-c", DHT_CALLS], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    grown, children = result.stdout.strip().split(" ", 1)
    assert int(grown) <= 2 and "torch_shm_manager" not in children and "p2pd" in children, result.stdout
