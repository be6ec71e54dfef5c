"""Process settings moekit asks of torch before it allocates anything large.

Large CPU buffers are written fresh at every step (a stacked expert weight gradient of hundreds of MB, the row
gathers of a prefill's dispatch); in 4 KB pages every first touch is a page fault, and the faults, not the writes,
dominate (a 300 MB zeroed gradient: about 150 ms here). torch's CPU allocator backs allocations of 2 MB and more
with transparent huge pages when THP_MEM_ALLOC_ENABLE is set (about 3-5x less here). Set THP_MEM_ALLOC_ENABLE=0
before importing moekit to keep torch's default."""

import os

os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")
