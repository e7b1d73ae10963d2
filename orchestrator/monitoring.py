"""System metrics of every node of a run, in the run's System metrics tab of the MLflow UI.

One worker per Ray node (its first rank) runs MLflow's SystemMetricsMonitor (mlflow.system_metrics: CPU, memory,
disk and network through psutil; utilisation, memory and power of every GPU of the node through
nvidia-ml-py), sampling every `tracking.system_metrics_interval` seconds (null: off). Names carry the node,
as MLflow does for multi-node runs: `system/<node>/cpu_utilization_percentage`, where <node> is the first 12
characters of the Ray node id (the run's `ray.worker_nodes` tag lists them; `ray.node.<node>` names its host).

The monitor is a daemon thread that logs straight to MLflow, not through the rank-0 queue of tracking.py:
it never blocks training, whatever MLflow does. MLflow's own loop ends for good at the first failed request;
ours keeps sampling through a tracking outage and sends what it holds (up to MAX_HELD values, the newest
kept) once MLflow answers again.
"""

from __future__ import annotations

import logging

from .delivery import quick_failing_http, say

try:
    from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor
    UNAVAILABLE = None
except ImportError as e:  # psutil absent (a dependency of this project): the run goes on without them
    SystemMetricsMonitor, UNAVAILABLE = object, e

MAX_HELD = 100_000  # metric values kept through an outage (≈ 15 per node per sample: days at 10 s)


def node_name(node_id: str) -> str:
    return node_id[:12]


class NodeMetricsMonitor(SystemMetricsMonitor):
    """MLflow's monitor of one node, kept going through tracking outages."""

    def monitor(self) -> None:
        try:  # steps go on after those the run has (a restarted worker group), asked here, off the training path
            self._logging_step = self._get_next_logging_step(self._run_id)
        except Exception:  # MLflow unreachable: this node's charts start again at step 0
            pass
        while not self._shutdown_event.is_set():
            for _ in range(self.samples_before_logging):
                self.collect_metrics()
                if self._shutdown_event.wait(self.sampling_interval):
                    break
            self.publish_metrics(self.aggregate_metrics())

    def publish_metrics(self, metrics: dict) -> None:
        prefix = f"{self._metrics_prefix}{self.node_id}/" if self.node_id else self._metrics_prefix
        step, self._logging_step = self._logging_step, self._logging_step + 1
        for monitor in self.monitors:
            monitor.clear_metrics()
        held = self.mlflow_logger
        try:
            held.record_metrics({prefix + k: v for k, v in metrics.items()}, step)  # sends when due
        except Exception:  # an outage: the values stay in the batch and go with the next send that works
            del held.data[:-MAX_HELD]

    def finish(self) -> None:
        """Stop and send what is held; MLflow's own finish logs a failed last send as an error naming the
        tracking URI (credentials too): here it is only lost."""
        if self._process is None:
            return
        self._shutdown_event.set()
        self._process.join()  # at most one request's timeout
        self._process = None
        try:
            self.mlflow_logger.flush()
        except Exception:
            pass


def start_system_metrics(interval: float | None, tracking_uri: str, run_id: str, node_id: str
                         ) -> NodeMetricsMonitor | None:
    """The node's monitor, started (None when interval is null or it cannot start). Nothing here waits on MLflow."""
    if not interval:
        return None
    if UNAVAILABLE is not None:
        say(f"[tracking] no system metrics from node {node_name(node_id)}: {UNAVAILABLE}")
        return None
    quick_failing_http(retries=0)  # the monitor tries again at its next sample
    logging.getLogger("mlflow.system_metrics").setLevel(logging.WARNING)  # no "started monitoring" lines
    try:
        monitor = NodeMetricsMonitor(run_id, sampling_interval=interval, node_id=node_name(node_id),
                                     tracking_uri=tracking_uri)
    except Exception as e:
        say(f"[tracking] no system metrics from node {node_name(node_id)}: {type(e).__name__}: {e}")
        return None
    monitor.start()
    return monitor
