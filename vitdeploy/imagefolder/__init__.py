"""Image-folder datasets (`ROOT/train/CLASS/IMAGE`, with val/ and test/ when present): the
listing and its checks (`listing`), the decode cache (`cache`), and the splits a run, an
export or a benchmark reads (`splits`). Importing this package loads no torch: the cache's
decoding workers import it."""
