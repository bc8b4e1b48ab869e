"""The GPU test of tests/test_stream_readers.py with the uploads memo retiring nothing it drops: the memory as it was
before the forty-sixth session (reused by the next allocation on the stream that uploaded, while another stream may
still read it). Run from the repository root with PYTHONPATH=$PWD:$PWD/tests on a CUDA machine; prints the result."""

from sparsecore.ir import uploads

import test_stream_readers

uploads._UPLOADS._on_drop = None
try:
    test_stream_readers.test_an_upload_dropped_while_another_stream_reads_it_keeps_its_memory_until_that_read()
    print("passed")
except AssertionError as err:
    print(f"FAILED: {str(err).splitlines()[0]}")
