"""A Cloud Storage server on 127.0.0.1 for the tests: gcp-storage-emulator (the GCS JSON API, as
gcsfs, google-cloud-storage, tensorboardX and tensorstore speak it), plus the parts of the API it
lacks: generation preconditions (`ifGenerationMatch`) on uploads and deletes, answered 412 as GCS
does (the workdir lock relies on them), the `x-goog-generation` header on downloads
(tensorstore, under orbax, reads an object's generation from it and refuses a download without),
and download links (mediaLink) that name the address each request came to.

With --tls-dir it also answers the one gRPC call gcsfs makes by default: its bucket-type probe
(the Storage Control API's GetStorageLayout, over TLS to the same host:port as the JSON API).
Unanswered, that probe retries for a minute before gcsfs falls back, and again on every call,
since an unknown type is not cached. A connection that opens with a TLS handshake goes to a gRPC
server with a self-signed certificate for 127.0.0.1 (written to D/ca.pem, which the clients
trust through GRPC_DEFAULT_SSL_ROOTS_FILE_PATH); every other connection is the JSON API. An
existing bucket is an ordinary regional one without hierarchical namespace, as most are.

python tests/gcs_server.py --port P [--data-dir D] [--tls-dir D]   (prints "ready" once it serves)
"""

import argparse
import functools
from http import HTTPStatus
from http import server as http_server
import os
import re
import sys
import threading
import time

from gcp_storage_emulator import server
from gcp_storage_emulator.exceptions import NotFound
from gcp_storage_emulator.handlers import objects

_LOCK = threading.Lock()  # the check and the write it guards are one step, as on GCS


def _current_generation(storage, bucket: str, name: str) -> int:
  try:
    return int(storage.get_file_obj(bucket, name).get('generation', 0))
  except NotFound:
    return 0


def _object_name(request) -> str | None:
  if 'object_id' in request.params:
    return request.params['object_id']
  if 'name' in request.query:
    return request.query['name'][0]
  data = request.data
  if isinstance(data, dict):
    return (data.get('meta') or {}).get('name') or data.get('name')
  return None


def _with_precondition(handler):
  @functools.wraps(handler)
  def wrapped(request, response, storage, *args, **kwargs):
    want = request.query.get('ifGenerationMatch')
    if not want:
      return handler(request, response, storage, *args, **kwargs)
    with _LOCK:
      name = _object_name(request)
      if name is not None and _current_generation(
        storage, request.params['bucket_name'], name
      ) != int(want[0]):
        response.status = HTTPStatus.PRECONDITION_FAILED
        response.json({'error': {'code': 412, 'message': 'Precondition Failed'}})
        return None
      return handler(request, response, storage, *args, **kwargs)

  return wrapped


def _with_generation_header(download):
  @functools.wraps(download)
  def wrapped(request, response, storage, *args, **kwargs):
    result = download(request, response, storage, *args, **kwargs)
    if response.status == HTTPStatus.OK or response.status == HTTPStatus.PARTIAL_CONTENT:
      try:
        obj = storage.get_file_obj(request.params['bucket_name'], request.params['object_id'])
      except NotFound:
        return result
      response['x-goog-generation'] = str(obj.get('generation', 0))
      response['x-goog-metageneration'] = str(obj.get('metageneration', 1))
    return result

  return wrapped


_MEDIA_LINK = re.compile(r'("mediaLink": ")https?://[^/"]+')


def _links_for_this_request(close):
  """Object resources name their download URL (mediaLink) with the host the object was
  *uploaded* through: a client that reached the server another way (directly, or through the
  test's fault proxy) would download through that other address. GCS answers with its own
  host; here each answer names the host this request came to (its Host header)."""

  @functools.wraps(close)
  def wrapped(self):
    host = self._handler.headers.get('Host')
    if host and isinstance(self._content, str) and '"mediaLink"' in self._content:
      self._content = _MEDIA_LINK.sub(lambda m: f'{m.group(1)}http://{host}', self._content)
    return close(self)

  return wrapped


def install_preconditions() -> None:
  """Wraps the emulator's upload, delete and download handlers wherever its router holds them
  (`objects.get` finds `download` by its module name at each call, the /download/ route
  holds it directly)."""
  download = objects.download
  objects.download = _with_generation_header(download)
  wrapped = {
    objects.insert: _with_precondition(objects.insert),
    objects.delete: _with_precondition(objects.delete),
    download: objects.download,
  }  # the /download/ route holds it directly
  for _, methods in server.HANDLERS:
    for method, handler in list(methods.items()):
      if handler in wrapped:
        methods[method] = wrapped[handler]
  objects.insert = wrapped[objects.insert]  # the router's fallback for uploads without /upload
  server.Response.close = _links_for_this_request(server.Response.close)


def write_self_signed_cert(folder: str) -> tuple[bytes, bytes]:
  """(key PEM, certificate PEM) for 127.0.0.1 and localhost; the certificate also in
  folder/ca.pem for the clients to trust."""
  import datetime
  import ipaddress

  from cryptography import x509
  from cryptography.hazmat.primitives import hashes
  from cryptography.hazmat.primitives import serialization
  from cryptography.hazmat.primitives.asymmetric import ec
  from cryptography.x509.oid import NameOID

  key = ec.generate_private_key(ec.SECP256R1())
  name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, 'idm_jax test GCS server')])
  now = datetime.datetime.now(datetime.timezone.utc)
  cert = (
    x509.CertificateBuilder()
    .subject_name(name)
    .issuer_name(name)
    .public_key(key.public_key())
    .serial_number(x509.random_serial_number())
    .not_valid_before(now - datetime.timedelta(days=1))
    .not_valid_after(now + datetime.timedelta(days=30))
    .add_extension(
      x509.SubjectAlternativeName(
        [x509.IPAddress(ipaddress.ip_address('127.0.0.1')), x509.DNSName('localhost')]
      ),
      critical=False,
    )
    .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
    .sign(key, hashes.SHA256())
  )
  key_pem = key.private_bytes(
    serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
  )
  cert_pem = cert.public_bytes(serialization.Encoding.PEM)
  os.makedirs(folder, exist_ok=True)
  with open(os.path.join(folder, 'ca.pem'), 'wb') as f:
    f.write(cert_pem)
  return key_pem, cert_pem


def start_storage_control(storage, key_pem: bytes, cert_pem: bytes):
  """A gRPC server (TLS, on a free port of 127.0.0.1) answering GetStorageLayout; (server, port)."""
  from concurrent import futures

  from google.cloud.storage_control_v2.types import storage_control
  import grpc

  def get_storage_layout(request, context):
    # name: projects/_/buckets/BUCKET/storageLayout
    bucket = request.name.split('/buckets/', 1)[-1].split('/', 1)[0]
    if storage.get_bucket(bucket) is None:
      context.abort(grpc.StatusCode.NOT_FOUND, f'bucket {bucket} not found')
    return storage_control.StorageLayout(
      name=request.name,
      location='US-CENTRAL1',
      location_type='region',
      hierarchical_namespace=storage_control.StorageLayout.HierarchicalNamespace(enabled=False),
    )

  handler = grpc.method_handlers_generic_handler(
    'google.storage.control.v2.StorageControl',
    {
      'GetStorageLayout': grpc.unary_unary_rpc_method_handler(
        get_storage_layout,
        request_deserializer=storage_control.GetStorageLayoutRequest.deserialize,
        response_serializer=storage_control.StorageLayout.serialize,
      )
    },
  )
  grpc_server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
  grpc_server.add_generic_rpc_handlers((handler,))
  port = grpc_server.add_secure_port(
    '127.0.0.1:0', grpc.ssl_server_credentials([(key_pem, cert_pem)])
  )
  grpc_server.start()
  return grpc_server, port


def serve_tls_elsewhere(grpc_port: int) -> None:
  """Makes the emulator's HTTP server pass connections that open with a TLS handshake to
  127.0.0.1:grpc_port (spliced in a thread of their own), and serve the rest itself."""
  sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
  from gcs_faults import _splice  # pylint: disable=import-outside-toplevel
  from gcs_faults import _starts_with_tls  # pylint: disable=import-outside-toplevel

  class Front(http_server.HTTPServer):
    request_queue_size = 128  # many clients connect at once; the default 5 drops SYNs

    def process_request(self, request, client_address):
      if _starts_with_tls(request):
        threading.Thread(target=self._splice_and_close, args=(request,), daemon=True).start()
        return
      super().process_request(request, client_address)

    @staticmethod
    def _splice_and_close(request):
      try:
        _splice(request, ('127.0.0.1', grpc_port))
      finally:
        request.close()

  def run(self):  # server.APIThread.run, with the front instead of a plain HTTPServer
    self._httpd = Front(
      (self._host, self._port), functools.partial(server.RequestHandler, self._storage)
    )
    self.is_running.set()
    self._httpd.serve_forever()

  server.APIThread.run = run


def main():
  p = argparse.ArgumentParser()
  p.add_argument('--port', type=int, required=True)
  p.add_argument('--data-dir', default=None)
  p.add_argument(
    '--tls-dir',
    default=None,
    help="answer gcsfs's gRPC bucket-type probe; its certificate goes to DIR/ca.pem",
  )
  a = p.parse_args()
  install_preconditions()
  srv = server.create_server('127.0.0.1', a.port, in_memory=a.data_dir is None, data_dir=a.data_dir)
  grpc_server = None
  if a.tls_dir:
    key_pem, cert_pem = write_self_signed_cert(a.tls_dir)
    grpc_server, grpc_port = start_storage_control(srv._storage, key_pem, cert_pem)  # pylint: disable=protected-access
    serve_tls_elsewhere(grpc_port)  # before srv.start(), which runs the APIThread
  srv.start()
  print('ready', flush=True)
  try:
    while True:
      time.sleep(3600)
  finally:
    srv.stop()
    if grpc_server is not None:
      grpc_server.stop(0)


if __name__ == '__main__':
  main()
