"""Peer servers for ``benchmarks/cpu_peers.py``: the usual ways to serve one model per task on a CPU.

* :mod:`benchmarks.peers.app`: a small FastAPI/uvicorn app with this server's REST route
  (``POST /v1/tasks/{task}/predict``) over one Hugging Face model copy per task (fp32, or torch dynamic
  int8) or one ONNX Runtime session per task;
* :mod:`benchmarks.peers.onnx_export`: the ONNX int8 model those sessions load, exported offline from
  the local backbone folder;
* :mod:`benchmarks.peers.procs`: server subprocesses (started in their own process group, all killed
  at the end) and the resident memory of a process tree.
"""
