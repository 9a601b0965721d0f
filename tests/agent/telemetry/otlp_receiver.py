"""Real OTLP receivers on 127.0.0.1 (HTTP/protobuf and gRPC) that decode the official
protobufs, plus a flattening of received requests into comparable data points."""

from __future__ import annotations

import gzip
import threading
import time
import zlib
from collections.abc import Callable
from concurrent import futures
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import grpc  # type: ignore[import-untyped]
from opentelemetry.proto.collector.metrics.v1 import metrics_service_pb2, metrics_service_pb2_grpc
from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import ExportMetricsServiceRequest
from opentelemetry.proto.common.v1.common_pb2 import AnyValue
from opentelemetry.proto.metrics.v1.metrics_pb2 import AggregationTemporality


@dataclass
class Received:
    path: str
    headers: dict[str, str]
    request: ExportMetricsServiceRequest


@dataclass
class Point:
    """One data point of a received metric, with its metric's metadata."""

    name: str
    unit: str
    kind: str  # gauge | sum | histogram
    monotonic: bool | None
    temporality: str | None  # cumulative | delta
    attributes: dict[str, Any]
    value: float | None = None
    count: int | None = None
    sum: float | None = None
    bounds: list[float] = field(default_factory=list)
    bucket_counts: list[int] = field(default_factory=list)
    min: float | None = None  # histograms: None when the point leaves it unset
    max: float | None = None
    start_time_unix_nano: int = 0
    resource: dict[str, Any] = field(default_factory=dict)
    scope: str = ""


def _any(value: AnyValue) -> Any:
    which = value.WhichOneof("value")
    return getattr(value, which) if which else None


def _attrs(kvs: Any) -> dict[str, Any]:
    return {kv.key: _any(kv.value) for kv in kvs}


def _temporality(value: int) -> str:
    if value == AggregationTemporality.AGGREGATION_TEMPORALITY_CUMULATIVE:
        return "cumulative"
    if value == AggregationTemporality.AGGREGATION_TEMPORALITY_DELTA:
        return "delta"
    return "unspecified"


def points(request: ExportMetricsServiceRequest) -> list[Point]:
    out: list[Point] = []
    for rm in request.resource_metrics:
        resource = _attrs(rm.resource.attributes)
        for sm in rm.scope_metrics:
            for m in sm.metrics:
                which = m.WhichOneof("data")
                data = getattr(m, which)
                common = {"name": m.name, "unit": m.unit, "resource": resource, "scope": sm.scope.name}
                if which == "gauge":
                    for dp in data.data_points:
                        value = dp.as_double if dp.WhichOneof("value") == "as_double" else dp.as_int
                        out.append(Point(kind="gauge", monotonic=None, temporality=None,
                                         attributes=_attrs(dp.attributes), value=value, **common))
                elif which == "sum":
                    for dp in data.data_points:
                        value = dp.as_double if dp.WhichOneof("value") == "as_double" else dp.as_int
                        out.append(Point(kind="sum", monotonic=data.is_monotonic,
                                         temporality=_temporality(data.aggregation_temporality),
                                         attributes=_attrs(dp.attributes), value=value, **common))
                elif which == "histogram":
                    for dp in data.data_points:
                        out.append(Point(kind="histogram", monotonic=None,
                                         temporality=_temporality(data.aggregation_temporality),
                                         attributes=_attrs(dp.attributes), count=dp.count, sum=dp.sum,
                                         bounds=list(dp.explicit_bounds), bucket_counts=list(dp.bucket_counts),
                                         min=dp.min if dp.HasField("min") else None,
                                         max=dp.max if dp.HasField("max") else None,
                                         start_time_unix_nano=dp.start_time_unix_nano, **common))
                else:
                    raise AssertionError(f"unexpected data {which} for {m.name}")
    return out


class _Store:
    def __init__(self) -> None:
        self.received: list[Received] = []
        self._cond = threading.Condition()

    def add(self, item: Received) -> None:
        with self._cond:
            self.received.append(item)
            self._cond.notify_all()

    def wait_for(self, predicate: Callable[[list[Received]], bool], timeout_s: float = 10.0) -> list[Received]:
        deadline = time.monotonic() + timeout_s
        with self._cond:
            while not predicate(self.received):
                left = deadline - time.monotonic()
                if left <= 0:
                    count = len(self.received)
                    raise AssertionError(f"receiver: condition not met in {timeout_s} s ({count} requests)")
                self._cond.wait(left)
            return list(self.received)

    def points(self) -> list[Point]:
        with self._cond:
            return [p for r in self.received for p in points(r.request)]

    def latest(self) -> dict[tuple[str, frozenset[tuple[str, Any]]], Point]:
        """The last point of every (name, attributes) stream (cumulative: the latest wins)."""
        out: dict[tuple[str, frozenset[tuple[str, Any]]], Point] = {}
        for p in self.points():
            out[(p.name, frozenset(p.attributes.items()))] = p
        return out


class OtlpHttpReceiver(_Store):
    """POST /anything: decodes ExportMetricsServiceRequest; answers ``status`` (settable)."""

    def __init__(self, status: int = 200) -> None:
        super().__init__()
        self.status = status
        store = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                encoding = self.headers.get("Content-Encoding", "")
                if encoding == "gzip":
                    body = gzip.decompress(body)
                elif encoding == "deflate":
                    body = zlib.decompress(body)
                if store.status == 200:
                    request = ExportMetricsServiceRequest()
                    request.ParseFromString(body)
                    store.add(Received(self.path, {k.lower(): v for k, v in self.headers.items()}, request))
                    payload = metrics_service_pb2.ExportMetricsServiceResponse().SerializeToString()
                else:
                    payload = b"unavailable"
                self.send_response(store.status)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            def log_message(self, format: str, *args: object) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.port = self._server.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(5)


class OtlpGrpcReceiver(_Store):
    """A real gRPC MetricsService on 127.0.0.1."""

    def __init__(self) -> None:
        super().__init__()
        store = self

        class Servicer(metrics_service_pb2_grpc.MetricsServiceServicer):
            def Export(self, request: ExportMetricsServiceRequest, context: grpc.ServicerContext) -> Any:
                headers = dict(context.invocation_metadata())
                store.add(Received("/opentelemetry.proto.collector.metrics.v1.MetricsService/Export", headers, request))
                return metrics_service_pb2.ExportMetricsServiceResponse()

        self._server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
        metrics_service_pb2_grpc.add_MetricsServiceServicer_to_server(Servicer(), self._server)  # type: ignore[no-untyped-call]
        self.port = self._server.add_insecure_port("127.0.0.1:0")
        self.url = f"http://127.0.0.1:{self.port}"
        self._server.start()

    def close(self) -> None:
        self._server.stop(grace=None).wait(5)
