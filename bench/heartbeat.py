"""Can the master carry the heartbeats of 10,000 mounts at 5 s intervals?

    python -m bench.heartbeat [--mounts 10000] [--interval 5] [--seconds 30]

Simulates the mounts' heartbeats (same request body and jitter as the real
guard) against a real master and reports the achieved rate and latency.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import time

import aiohttp

from bench.common import bench_cluster, show


async def load(master: str, key: str, mounts: int, interval: float,
               seconds: float) -> tuple[float, int, list[float]]:
    """Returns the steady-state rate (after the first interval), errors, latencies."""
    latencies: list[float] = []
    done_at: list[float] = []
    start = time.monotonic()
    errors = 0
    end = time.monotonic() + seconds
    conn = aiohttp.TCPConnector(limit=200)
    async with aiohttp.ClientSession(connector=conn) as session:
        async def mount(i: int) -> None:
            nonlocal errors
            body = {"host": "bench", "pid": i, "mountpoint": f"/mnt/{i}", "version": "bench",
                    "mounted_at": time.time()}
            await asyncio.sleep(random.uniform(0, interval))
            # each mount opens its session with the key, then heartbeats with its capability
            async with session.post(f"http://{master}/client/session", json={"volume": "hb", "key": key}) as r:
                cap = (await r.json())["data"]["capability"]
            while time.monotonic() < end:
                t = time.perf_counter()
                try:
                    async with session.post(f"http://{master}/client/heartbeat", json=body,
                                            headers={"Authorization": f"Capability {cap}"}) as r:
                        env = await r.json()
                        if env["code"] != 0:
                            errors += 1
                        else:
                            cap = env["data"]["capability"]  # renewed, as the real guard does
                except (TimeoutError, aiohttp.ClientError):
                    errors += 1
                latencies.append(time.perf_counter() - t)
                done_at.append(time.monotonic() - start)
                await asyncio.sleep(interval * random.uniform(0.9, 1.1))
        await asyncio.gather(*(mount(i) for i in range(mounts)))
    steady = [d for d in done_at if interval <= d <= seconds]
    return len(steady) / (seconds - interval), errors, latencies


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mounts", type=int, default=10000)
    ap.add_argument("--interval", type=float, default=5.0)
    ap.add_argument("--seconds", type=float, default=30.0)
    args = ap.parse_args()
    with bench_cluster() as c:
        c.create_volume("hb")
        with open(c.key_file("hb")) as f:
            key = f.read().strip()
        rate, errors, lat = asyncio.run(load(c.master_addr, key, args.mounts, args.interval, args.seconds))
        sessions = len(c.http_get("/volume/clients?name=hb") or [])
    lat.sort()
    rows = [[str(args.mounts), f"{args.interval:g} s", f"{args.mounts / args.interval:.0f}/s",
             f"{rate:.0f}/s", f"{lat[len(lat) // 2] * 1000:.1f}", f"{lat[int(len(lat) * 0.99)] * 1000:.1f}",
             str(errors), str(sessions)]]
    show("master heartbeat load", ["mounts", "interval", "needed", "achieved", "p50 ms", "p99 ms", "errors",
                                   "sessions listed"], rows)


if __name__ == "__main__":
    main()
