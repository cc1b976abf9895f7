#!/usr/bin/env python3
"""Writes a large tollgate config: KEYS keys, ALIASES aliases and
DEPLOYMENTS deployments spread over them, on simulated backends, so that
`tollgate check`, a reload and the snapshot's memory can be measured at
the scale issue 23 names (100,000 keys, 200 aliases, 1,000 deployments).

    benches/config_scale/generate.py OUT.toml [KEYS ALIASES DEPLOYMENTS]

Every tenth key has a daily budget; every key may call every alias
through the list of five aliases it names, as a fleet's generated config
would. Only the Python standard library."""

import hashlib
import sys


def main():
    out = sys.argv[1]
    keys, aliases, deployments = (int(a) for a in (sys.argv[2:5] or (100_000, 200, 1_000)))
    backends = max(1, deployments // 10)
    lines = ["[server]", 'listen = "127.0.0.1:18090"', "", "[admin]", 'token_env = "TOLLGATE_ADMIN_TOKEN"', ""]
    for b in range(backends):
        lines += ["[[backends]]", f'name = "sim-{b}"', 'kind = "simulated"', ""]
    for a in range(aliases):
        lines += ["[[models]]", f'alias = "model-{a}"', 'strategy = "cost"', ""]
        share = deployments // aliases + (1 if a < deployments % aliases else 0)
        for d in range(share):
            backend = (a * 7 + d) % backends
            lines += [
                "[[models.deployments]]",
                f'backend = "sim-{backend}"',
                f'name = "model-{a}/d{d}"',
                f'model = "upstream-{a}-{d}"',
                "context_window = 131072",
                f"input_usd_per_mtok = {0.1 + d * 0.01:.2f}",
                f"output_usd_per_mtok = {0.3 + d * 0.01:.2f}",
                "",
            ]
    for k in range(keys):
        digest = hashlib.sha256(f"key-{k}".encode()).hexdigest()
        models = ", ".join(f'"model-{(k + i) % aliases}"' for i in range(5))
        lines += ["[[keys]]", f'name = "team-{k}"', f'sha256 = "{digest}"', f"models = [{models}]"]
        if k % 10 == 0:
            lines.append("budget_daily_usd = 25.0")
        lines.append("")
    with open(out, "w") as f:
        f.write("\n".join(lines))


if __name__ == "__main__":
    main()
