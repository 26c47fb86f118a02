"""A stand-in for the GCE metadata server that a Cloud TPU VM worker asks about its slice.

jax's GceTpuCluster reads http://$GCE_METADATA_IP/computeMetadata/v1/instance/attributes/<key>
with the header `Metadata-Flavor: Google`: `agent-worker-number` (this worker), the slice's
`worker-network-endpoints` and `tpu-env` (multislice settings). This server answers those on
127.0.0.1 as the real one does: a plain-text value, 403 without the header, 404 for an attribute
the VM does not have. It records every key asked for, so a test can also show that nothing was.
"""

from __future__ import annotations

import http.server
import threading

PREFIX = '/computeMetadata/v1/instance/attributes/'


def tpu_vm_attributes(
  worker: int,
  endpoints: list[str],
  accelerator: str = 'v4-16',
  tpu_env: dict[str, str] | None = None,
) -> dict[str, str]:
  """The attributes of worker `worker` of a TPU VM slice whose workers are at `endpoints`
  (in worker order). Endpoints are written in the long form `unknown:unknown:<ip>` that slices
  made by `gcloud compute tpus tpu-vm create` report; jax also accepts bare host names."""
  env = {
    'ACCELERATOR_TYPE': accelerator,
    'WORKER_ID': str(worker),
    'ZONE': 'us-central2-b',
    **(tpu_env or {}),
  }
  return {
    'agent-worker-number': str(worker),
    'accelerator-type': accelerator,
    'worker-network-endpoints': ','.join(
      e if e.count(':') == 2 else f'unknown:unknown:{e}' for e in endpoints
    ),
    # The real value is YAML-like lines, KEY: 'value'.
    'tpu-env': ''.join(f"{k}: '{v}'\n" for k, v in env.items()),
  }


class MetadataServer:
  """Serves `attributes` on 127.0.0.1 in a thread; `address` is what GCE_METADATA_IP takes."""

  def __init__(self, attributes: dict[str, str]):
    self.attributes = dict(attributes)
    self.asked: list[str] = []
    server = self

    class Handler(http.server.BaseHTTPRequestHandler):
      def do_GET(self):  # noqa: N802 (the http.server API)
        key = self.path.split('?')[0][len(PREFIX) :] if self.path.startswith(PREFIX) else None
        server.asked.append(key or self.path)
        if self.headers.get('Metadata-Flavor') != 'Google':
          self._reply(403, 'Missing required header: Metadata-Flavor')
        elif key in server.attributes:
          self._reply(200, server.attributes[key])
        else:
          self._reply(404, 'The requested URL was not found on this server.')

      def _reply(self, code: int, text: str):
        body = text.encode()
        self.send_response(code)
        self.send_header('Metadata-Flavor', 'Google')
        self.send_header('Content-Type', 'application/text')
        self.send_header('Content-Length', str(len(body)))
        self.end_headers()
        self.wfile.write(body)

      def log_message(self, *args):  # quiet
        pass

    self._httpd = http.server.ThreadingHTTPServer(('127.0.0.1', 0), Handler)
    self.address = f'127.0.0.1:{self._httpd.server_address[1]}'
    self._thread = threading.Thread(target=self._httpd.serve_forever, daemon=True)
    self._thread.start()

  def close(self) -> None:
    self._httpd.shutdown()
    self._httpd.server_close()
    self._thread.join()

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()
