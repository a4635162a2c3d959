"""MLflow system metrics of one node, on the training's step axis.

MLflow's own ``SystemMetricsMonitor`` samples CPU, memory, disk, network and (with ``nvidia-ml-py``) every NVIDIA
GPU of the machine in a thread and logs them at its own counter 0, 1, 2, ...  Training logs everything else at
step = images seen, so here the same monitors are sampled every ``interval`` seconds in a thread and their means
are logged at each tick end, at that tick's image count, as ``system/<node>/<name>`` (MLflow's naming for
several nodes, which its UI shows in the run's "System metrics" tab). One sampler per node: local rank 0.
"""

from __future__ import annotations

import logging
import threading
import time

_log = logging.getLogger(__name__)


class NodeSystemMetrics:
    def __init__(self, tracking_uri: str, run_id: str, node: str, interval: float):
        from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor
        from mlflow.tracking import MlflowClient

        self.run_id, self.node, self.interval = run_id, node, float(interval)
        self.client = MlflowClient(tracking_uri)
        logging.getLogger("mlflow.system_metrics").setLevel(logging.WARNING)  # "Skip logging GPU metrics" etc.
        # The monitor object is only a container of MLflow's per-device monitors (its thread is never started).
        self._monitor = SystemMetricsMonitor(run_id, sampling_interval=self.interval, node_id=node,
                                             tracking_uri=tracking_uri)
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._samples = 0
        self._sample()  # psutil's CPU percentage is measured from one call to the next: prime it
        self._reset()
        self._thread = threading.Thread(target=self._run, name=f"system-metrics-{node}", daemon=True)
        self._thread.start()

    @property
    def devices(self) -> list[str]:
        return [type(m).__name__ for m in self._monitor.monitors]

    def _sample(self) -> None:
        with self._lock:
            try:
                self._monitor.collect_metrics()
                self._samples += 1
            except Exception as e:  # a device that went away must not stop training
                _log.warning("system metrics: sampling failed (%s)", e)

    def _reset(self) -> None:
        with self._lock:
            for m in self._monitor.monitors:
                m.clear_metrics()
            self._samples = 0

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self._sample()

    def flush(self, step: int) -> dict[str, float]:
        """Log the means since the last flush at ``step``; returns what was logged (keys with their prefix)."""
        from mlflow.entities import Metric

        if self._samples == 0:  # a tick shorter than the interval still gets a value
            self._sample()
        with self._lock:
            values = self._monitor.aggregate_metrics()
            for m in self._monitor.monitors:
                m.clear_metrics()
            self._samples = 0
        prefix = f"system/{self.node}/"
        ts = int(time.time() * 1000)
        logged = {prefix + k: float(v) for k, v in values.items()}
        items = [Metric(k, v, ts, int(step)) for k, v in logged.items()]
        try:
            for i in range(0, len(items), 200):
                self.client.log_batch(self.run_id, metrics=items[i:i + 200])
        except Exception as e:  # the tracking server being briefly away loses one sample, not the run
            _log.warning("system metrics: logging failed (%s)", e)
            return {}
        return logged

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=self.interval + 5)
