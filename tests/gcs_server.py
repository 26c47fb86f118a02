"""A Cloud Storage server on 127.0.0.1 for the tests: gcp-storage-emulator (the GCS JSON API, as
gcsfs, google-cloud-storage, tensorboardX and tensorstore speak it), plus two parts of the API it
lacks: generation preconditions (`ifGenerationMatch`) on uploads and deletes, answered 412 as GCS
does (the workdir lock relies on them), and the `x-goog-generation` header on downloads
(tensorstore, under orbax, reads an object's generation from it and refuses a download without).

python tests/gcs_server.py --port P [--data-dir D]   (prints "ready" once it serves)
"""
import argparse
import functools
import threading
import time
from http import HTTPStatus

from gcp_storage_emulator import server
from gcp_storage_emulator.exceptions import NotFound
from gcp_storage_emulator.handlers import objects

_LOCK = threading.Lock()   # the check and the write it guards are one step, as on GCS


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
          storage, request.params['bucket_name'], name) != int(want[0]):
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


def install_preconditions() -> None:
  """Wraps the emulator's upload, delete and download handlers wherever its router holds them
  (`objects.get` finds `download` by its module name at each call)."""
  objects.download = _with_generation_header(objects.download)
  wrapped = {objects.insert: _with_precondition(objects.insert),
             objects.delete: _with_precondition(objects.delete)}
  for _, methods in server.HANDLERS:
    for method, handler in list(methods.items()):
      if handler in wrapped:
        methods[method] = wrapped[handler]
  objects.insert = wrapped[objects.insert]   # the router's fallback for uploads without /upload


def main():
  p = argparse.ArgumentParser()
  p.add_argument('--port', type=int, required=True)
  p.add_argument('--data-dir', default=None)
  a = p.parse_args()
  install_preconditions()
  srv = server.create_server('127.0.0.1', a.port, in_memory=a.data_dir is None,
                             data_dir=a.data_dir)
  srv.start()
  print('ready', flush=True)
  try:
    while True:
      time.sleep(3600)
  finally:
    srv.stop()


if __name__ == '__main__':
  main()
