"""A throwaway multi-node Ray cluster for e2e tests, sealed in its own namespaces (imported by basename).

Rules, learned the hard way on these machines (see the shared FACTS.md, "Ray on these machines"):
- Every Ray process runs inside a fresh `unshare -n -p -f --mount-proc` namespace with only `lo` up.
  Ray does not stay on loopback: even with the dashboard and usage stats off it probes 8.8.8.8:53,
  cloud metadata addresses and resolvers. In an empty network namespace those probes fail at once,
  and the node IP is 127.0.0.1.
- Never run `ray stop` outside such a namespace: it kills every Ray process on the host by name.
  Nothing here needs it: the namespace's init is bash (the `unshare -f` child); when the script ends
  bash exits and the kernel kills everything left in the PID namespace. `--kill-child` makes killing
  `unshare` (our timeout) take the namespace down too.
- `ray.init(address=...)` always with an explicit address (`DFUSE_RAY_ADDRESS`): without one it may
  attach to some other cluster.
- RAY_worker_niceness=0: Ray nices its workers, and under CPU load a 16 s test took 45-60 s.
- Each cluster gets its own --temp-dir: /tmp is shared with the host, and /tmp/ray with other runs.

The script sees DFUSE_RAY_ADDRESS ("127.0.0.1:<head port>"), DFUSE_RAYLET_PIDS (json
{"a": pid, ...}, PIDs inside the namespace, so the script can SIGKILL a node's raylet) and
DFUSE_RAY_REJOIN (json {"b": argv}: `ray start` for that node again, on ports of its own, once
it was killed: a node that comes back).
A driver always attaches to the head node's raylet (Ray prefers the head among nodes on one IP).
"""

import json
import os
import shutil
import subprocess
import sys
import tempfile

HEAD_PORT = 6379

# Nodes are declared dead after period * threshold without an answer: Ray's default (3 s x 5)
# keeps a killed node "alive" for ~15 s; this makes it ~4 s here. `env` may override.
_FAST_HEALTH_CHECKS = {
    "RAY_health_check_period_ms": "1000",
    "RAY_health_check_timeout_ms": "1000",
    "RAY_health_check_failure_threshold": "3",
}

# Runs inside the namespace (child of bash, PID 1 there, which reaps Ray's orphaned daemons).
# argv: nodes json, temp dir, script. Exit code is the script's, or 97 if the cluster did not start.
_LAUNCHER = r"""
import json, os, subprocess, sys
nodes, temp_dir, script = json.loads(sys.argv[1]), sys.argv[2], sys.argv[3]
ray = [sys.executable, "-m", "ray.scripts.scripts", "start"]
head = f"127.0.0.1:{HEAD_PORT}"
pids, rejoin = {}, {}

def node_args(name, cpus, nm_port, workers_from):
    return ["--node-ip-address", "127.0.0.1", "--labels", f"dfuse-node={name}",
            "--num-cpus", str(cpus), "--object-store-memory", str(256 << 20), "--disable-usage-stats",
            "--node-manager-port", str(nm_port), "--object-manager-port", str(nm_port + 1),
            "--dashboard-agent-listen-port", str(nm_port + 2),
            "--min-worker-port", str(workers_from), "--max-worker-port", str(workers_from + 999)]

for i, (name, cpus) in enumerate(nodes.items()):
    # Explicit, distinct ports per node: two raylets share one IP, so nothing may collide,
    # and the node manager port is how we find this node's raylet below.
    nm_port = 7000 + 10 * i
    args = node_args(name, cpus, nm_port, 20000 + 1000 * i)
    # The same node starting again after its raylet was killed: ports of its own (what the
    # killed node left may still hold the old ones for a while).
    rejoin[name] = ray + ["--address", head] + node_args(name, cpus, nm_port + 5, 40000 + 1000 * i)
    if i == 0:  # only the head takes these (a worker node refuses --include-dashboard)
        args = ["--head", "--port", str(HEAD_PORT), "--temp-dir", temp_dir,
                "--include-dashboard=false"] + args
    else:
        args = ["--address", head] + args
    started = subprocess.run(ray + args, capture_output=True, text=True)
    if started.returncode:  # `ray start` only returns once the node is registered with the GCS
        sys.stderr.write(f"ray start for node {name} failed:\n{started.stdout}{started.stderr}")
        sys.exit(97)
    for proc in os.listdir("/proc"):
        try:
            with open(f"/proc/{proc}/cmdline", "rb") as f:
                argv = f.read().decode().split("\0")
        except (OSError, ValueError):
            continue
        if argv[0].endswith("/raylet") and f"--node_manager_port={nm_port}" in argv:
            pids[name] = int(proc)
    if name not in pids:
        sys.stderr.write(f"no raylet found for node {name}")
        sys.exit(97)
env = dict(os.environ, DFUSE_RAY_ADDRESS=head, DFUSE_RAYLET_PIDS=json.dumps(pids), DFUSE_RAY_REJOIN=json.dumps(rejoin))
sys.exit(subprocess.run([sys.executable, "-c", script], env=env).returncode)
""".replace("HEAD_PORT", str(HEAD_PORT))

_NAMESPACE = ["unshare", "-n", "-p", "-f", "--mount-proc", "--kill-child"]


def _skip_reason() -> str | None:
    for tool in ("unshare", "ip"):
        if shutil.which(tool) is None:
            return f"`{tool}` not found: Ray tests must run in their own namespaces"
    try:
        probe = subprocess.run(
            [*_NAMESPACE, "bash", "-c", 'ip link set lo up && "$0" -c "import ray"', sys.executable],
            capture_output=True, text=True, timeout=60,
        )
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"cannot probe namespaces: {e}"
    if probe.returncode:
        return f"no `import ray` in a fresh network+PID namespace (needs root, ray): {probe.stderr.strip()[-500:]}"
    return None


RAY_SKIP_REASON: str | None = _skip_reason()


def run_in_ray_namespace(
    script: str,
    nodes: dict[str, int] | None = None,
    timeout: float = 300,
    env: dict | None = None,
) -> subprocess.CompletedProcess:
    """Start a cluster with one node per entry of `nodes` (label dfuse-node=<name>, num_cpus=<value>,
    the first is the head), run `python -c script` against it, and return its output (text).
    Raises subprocess.TimeoutExpired after `timeout` seconds, with the whole namespace killed.
    `env` is added to the environment of both the Ray processes (RAY_* system settings) and the script.
    The Ray session dir (logs) is kept, and named on stderr, only when the script fails."""
    nodes = {"a": 1, "b": 1} if nodes is None else nodes
    temp_dir = tempfile.mkdtemp(prefix="dfuse-ray-")
    # RAY_AUTH_MODE=disabled: Ray 2.60 turns token auth on by itself once ~/.ray/auth_token
    # exists, and a new head writes one there: two clusters on one host (two runs side by side)
    # then overwrite each other's token and their nodes cannot join. The namespace isolates
    # these clusters; nothing outside it can reach them.
    full_env = dict(os.environ, RAY_worker_niceness="0", RAY_USAGE_STATS_ENABLED="0", RAY_AUTH_MODE="disabled",
                    **_FAST_HEALTH_CHECKS)
    full_env.update(env or {})
    # `; exit $?` keeps bash from exec'ing python: bash must stay PID 1 to reap Ray's orphans.
    command = [*_NAMESPACE, "bash", "-c", 'ip link set lo up && "$0" -c "$1" "$2" "$3" "$4"; exit $?',
               sys.executable, _LAUNCHER, json.dumps(nodes), temp_dir, script]
    try:
        # On timeout, run() SIGKILLs unshare; --kill-child then kills the namespace's init.
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=full_env)
    except subprocess.TimeoutExpired as e:
        e.add_note(f"Ray logs kept in {temp_dir}")
        raise
    if done.returncode == 0:
        shutil.rmtree(temp_dir, ignore_errors=True)
    else:
        done.stderr += f"\n[ray_cluster] Ray logs kept in {temp_dir}\n"
    return done
