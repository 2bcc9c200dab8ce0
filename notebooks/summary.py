"""Print what an executed notebook's cells printed, one block a cell, and how much widget state it kept."""
import sys

import nbformat

nb = nbformat.read(sys.argv[1], as_version=4)
for cell in nb.cells:
    if cell.cell_type != "code":
        continue
    print(f">>> {cell.source.splitlines()[0]}")
    for out in cell.outputs:
        text = out.get("text") or out.get("data", {}).get("text/plain", "")
        for line in str(text).strip().splitlines()[:8]:
            print(f"    {line[:160]}")
state = nb.metadata.get("widgets", {}).get("application/vnd.jupyter.widget-state+json", {}).get("state", {})
print(f"executed copy: {sys.argv[1]} ({len(state)} widget models saved)")
