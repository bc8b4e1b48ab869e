"""Why the stream readers' GPU test passed with the memo retiring nothing (run46t): the addresses the caching
allocator hands out, for the test's upload and for a tensor made on the stream directly, with and without
``record_stream``. Run from the repository root with PYTHONPATH=$PWD on a CUDA machine."""

import os

import numpy as np
import torch

from sparsecore.ir import uploads

SIZE = 1 << 18          # float32 elements: 1 MiB


def case(name: str, make, record: bool) -> None:
    torch.cuda.synchronize()
    builder, reader = torch.cuda.Stream(), torch.cuda.Stream()
    with torch.cuda.stream(builder):
        made = make()
    torch.cuda.synchronize()
    where = made.data_ptr()
    with torch.cuda.stream(reader):
        torch.cuda._sleep(1_000_000_000)
        read = made * 1
    if record:
        made.record_stream(reader)
    uploads.clear()
    del made
    with torch.cuda.stream(builder):
        reused = torch.empty(SIZE, dtype=torch.float32, device="cuda")
        reused.fill_(-1.0)
    torch.cuda.synchronize()
    print(f"{name:28s} record_stream={record!s:5s} same address={reused.data_ptr() == where!s:5s} "
          f"read intact={bool((read.cpu() >= 0).all())}")


print({name: os.environ.get(name) for name in ("PYTORCH_CUDA_ALLOC_CONF", "PYTORCH_ALLOC_CONF",
                                                 "CUDA_DEVICE_MAX_CONNECTIONS", "CUDA_LAUNCH_BLOCKING")})
array = np.arange(SIZE, dtype=np.float32)
for record in (False, True):
    case("upload (on_device)", lambda: uploads.on_device(array, "cuda"), record)
    case("upload, device cuda:0", lambda: uploads.on_device(array + 1, torch.device("cuda", 0)), record)
    case("torch.empty on the stream", lambda: torch.arange(SIZE, dtype=torch.float32, device="cuda"), record)
    case("from_numpy .to(cuda)", lambda: torch.from_numpy(array.copy()).to("cuda"), record)
