"""The committed sets as they were before benchmarks/README §11 set some entries back to vLLM's default: the tests
that replay an earlier session's judgements against "the committed set" need the entries it judged."""

import json
import re
import shutil
from pathlib import Path

KEYS = ("BLOCK_SIZE_M", "BLOCK_SIZE_N", "BLOCK_SIZE_K", "GROUP_SIZE_M", "num_warps", "num_stages")


def before_defaults(src: Path, dest: Path) -> list[dict]:
    """Copy the config files and sidecars of ``src`` to ``dest`` with each entry a sidecar's ``defaulted`` records
    put back (its config, in the file and as the row's tuned config) and the record dropped; the records, each with
    its file."""
    dest.mkdir(parents=True, exist_ok=True)
    for path in src.glob("E=*.json"):
        shutil.copy(path, dest / path.name)
    undone = []
    for side_path in sorted(dest.glob("*.provenance.json")):
        side = json.loads(side_path.read_text())
        records = side.pop("defaulted", [])
        if not records:
            continue
        config_path = dest / side["file"]
        table = json.loads(config_path.read_text())
        for d in records:
            entry = dict(zip(KEYS, map(int, re.findall(r"\d+", d["replaces"]))))
            table[str(d["m"])] = entry
            side["results"][str(d["m"])]["tuned"] = entry
            undone.append({**d, "file": side["file"]})
        config_path.write_text(json.dumps(table, indent=4) + "\n")
        side_path.write_text(json.dumps(side, indent=4) + "\n")
    return undone
