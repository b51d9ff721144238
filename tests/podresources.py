"""A pod-resources double: the kubelet's `v1.PodResourcesLister` on a unix socket, for tests.

`List` answers from `pods`, a dict the test sets: "<namespace>/<pod>" -> {resource:
[device IDs]} (one container per resource, which is all nodedev reads). Every call
is counted, so a test can tell whether the kubelet was asked; `wait_calls` waits
for a count, with a timeout. `delay` makes every answer late (a slow kubelet).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc

from nodedev.api import podresources_pb2 as pr
from nodedev.api import podresources_pb2_grpc as pr_grpc


class PodResourcesDouble(pr_grpc.PodResourcesListerServicer):
    def __init__(self, socket: Path) -> None:
        self.socket = socket
        self.pods: dict[str, dict[str, list[str]]] = {}
        self.calls = 0
        self.delay = 0.0
        self._cond = threading.Condition()
        self._server: grpc.Server | None = None

    def start(self) -> PodResourcesDouble:
        self.socket.parent.mkdir(parents=True, exist_ok=True)
        server = grpc.server(ThreadPoolExecutor(max_workers=4))
        pr_grpc.add_PodResourcesListerServicer_to_server(self, server)
        server.add_insecure_port(f"unix://{self.socket}")
        server.start()
        self._server = server
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.stop(0).wait(5)
            self._server = None
        self.socket.unlink(missing_ok=True)

    def set_pods(self, pods: dict[str, dict[str, list[str]]]) -> None:
        with self._cond:
            self.pods = {who: {res: list(ids) for res, ids in held.items()} for who, held in pods.items()}

    def call_count(self) -> int:
        with self._cond:
            return self.calls

    def wait_calls(self, predicate: Callable[[int], bool], timeout: float = 5.0, what: str = "calls") -> None:
        deadline = time.monotonic() + timeout
        with self._cond:
            while not predicate(self.calls):
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(f"pod-resources double: timed out after {timeout} s waiting for {what} (calls: {self.calls})")
                self._cond.wait(left)

    def List(self, request: pr.ListPodResourcesRequest, context: grpc.ServicerContext) -> pr.ListPodResourcesResponse:
        with self._cond:
            pods = dict(self.pods)
            delay = self.delay
        if delay:
            threading.Event().wait(delay)  # a slow kubelet; the client's timeout is what is tested
        response = pr.ListPodResourcesResponse()
        for who, held in pods.items():
            namespace, _, name = who.partition("/")
            pod = response.pod_resources.add(name=name, namespace=namespace)
            for resource, ids in held.items():
                container = pod.containers.add(name=f"c-{len(pod.containers)}")
                container.devices.add(resource_name=resource, device_ids=ids)
        with self._cond:
            self.calls += 1
            self._cond.notify_all()
        return response
