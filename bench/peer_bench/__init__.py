"""peer_bench — the PEER benchmark harness: `python -m peer_bench --help`.

Every backend runs in its own worker process (peer_bench.worker); nothing here imports a
framework, and nothing is written until a run finishes.
"""
