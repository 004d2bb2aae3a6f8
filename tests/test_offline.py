"""An offline run opens no network connection: a socket audit hook watches a whole tiny chain.

Local IPC (AF_UNIX sockets of multiprocessing/DataLoader workers) is allowed; any IP connection or
name lookup fails the test.
"""

from __future__ import annotations

import json
import subprocess
import sys

CODE = """
import json, sys
events = []
def hook(event, args):
    if event == "socket.connect" and isinstance(args[1], tuple):  # AF_INET/AF_INET6; AF_UNIX paths are local IPC
        events.append(["connect", repr(args[1])])
    elif event == "socket.getaddrinfo":
        events.append(["getaddrinfo", repr(args[0])])
sys.addaudithook(hook)
from pipeline.cli import main
rc = main(["run", "--config", "tiny", "--run-dir", sys.argv[1], "eval.limit=2", "eval.tasks=demo_pope_random"])
print("AUDIT " + json.dumps({"rc": rc, "events": events}))
"""


def test_tiny_chain_opens_no_socket(tmp_path):
    proc = subprocess.run([sys.executable, "-c", CODE, str(tmp_path / "run")], capture_output=True, text=True,
                          timeout=600)
    line = [x for x in proc.stdout.splitlines() if x.startswith("AUDIT ")]
    assert line, proc.stderr[-2000:]
    audit = json.loads(line[-1][len("AUDIT "):])
    assert audit["rc"] == 0, proc.stderr[-2000:]
    assert audit["events"] == [], audit["events"]
