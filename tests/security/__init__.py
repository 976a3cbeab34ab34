"""Security suite: hostile events, images and servers through the worker's whole prepare path.

Every case runs what the worker runs for one record: ``parse_event`` and then
``prepare_event`` with a real ``ProcessDecoder`` (one session-wide decoder process), and
checks four things:

* no crash: the worker-side code returns a ``FailedEvent`` or ``PreparedEvent``, it never
  raises, and the outcome encodes into a valid dead letter or result;
* bounded time: the elapsed time stays under a bound that follows from the configured
  deadlines (``fetch.timeout_s`` = 2 s, ``read_timeout_s`` = 1 s, ``decode.timeout_s``) plus
  slack for slow shared CI cores;
* bounded memory: this process's peak RSS growth over the case (``VmHWM`` after resetting it
  through ``/proc/self/clear_refs``, or a 1 ms ``VmRSS`` sampler where that reset is not
  allowed) stays under a bound; ``test_memory_meter_sees_a_buffered_bomb`` proves the
  meter fails when a bomb's worth of bytes is buffered;
* the expected dead-letter kind (or, for images that must work, RGB crops of the right size).

No test connects anywhere but its own servers on 127.0.0.1 / ::1: an autouse fixture
(conftest.network) fails the test on any other connect and answers name lookups from a
fixed table (numeric forms through the real resolver with AI_NUMERICHOST, so no DNS query
ever leaves the machine).

Cases
-----
test_events.py
    event_too_large; deep nesting (lists, objects); huge integer literals; not UTF-8
    (invalid bytes, UTF-16, UTF-32, UTF-8 BOM); NaN / Infinity; duplicate keys at any
    depth, also spelt with escapes -> invalid_event naming the key and its path (a
    duplicate inside a string is none); unknown schemes (ftp, gopher, javascript, jar,
    ...) -> invalid_event; hypothesis fuzz of parse_event over arbitrary bytes and over
    JSON-ish events (only EventError escapes, accepted events round-trip).
test_hostile_files.py (file:// under fetch.file_roots)
    zero-byte, truncated PNG / JPEG -> image_undecodable; declared-dimension bombs (PNG
    100000x100000, JPEG, GIF, BMP headers), a real 20000x20000 1-bit palette PNG of ~60 KB,
    a zTXt text-chunk bomb -> image_too_large / image_undecodable, parent memory flat; a
    sparse 8 GiB file -> image_too_large after reading max_bytes; 1x1 -> one 1x1 crop;
    60000x1 -> a 60000x1 crop under max_pixels, image_too_large over it; a 3000-frame GIF
    -> the first frame only, quickly; CMYK JPEG, 16-bit PNG, palette + transparency, LA,
    1-bit, RGBA -> RGB crops with the right colours; 64 full-frame face boxes on a small
    PNG (crop amplification).
test_hostile_http.py (scripted servers on 127.0.0.1)
    HTML / SVG / PDF served as image/png -> image_undecodable; a gzip bomb with
    Content-Encoding: gzip is not expanded (no Accept-Encoding but identity) ->
    image_undecodable, memory flat; a body and, separately, headers trickled a byte at a
    time -> image_fetch_failed at timeout_s; a server that accepts and stays silent (before
    and after the headers) -> image_fetch_failed at read_timeout_s, and retries multiply
    only that; an endless chunked / unsized body -> image_too_large at max_bytes, memory
    flat; lying Content-Length (small with more bytes, huge then close, huge then silence,
    huge and endless); a smuggled second response is never served for the next fetch;
    header floods, over-long lines, endless 1xx responses, bad status lines, bad chunk
    sizes, resets -> image_fetch_failed, bounded.
test_ssrf.py
    redirects from an allowed first hop ("localhost" in allow_hosts) to 127.0.0.1,
    169.254.169.254, [::ffff:127.0.0.1], [::1], 0, decimal 2130706433, a scheme-relative
    //169.254.169.254, userinfo, file:, gopher: -> image_fetch_refused after exactly one
    connection (the first hop); redirect loops -> image_fetch_failed; image URLs naming
    loopback, metadata or private addresses in decimal, octal, hex, short, fullwidth and
    circled-digit forms, IPv6 forms and names that resolve there -> image_fetch_refused
    with no connection; userinfo -> refused before any lookup; any file:// without
    fetch.file_roots (the default), and file:// escapes (.., %2e%2e, symlinked file and
    folder, file://localhost/, /proc, a sibling with the root's prefix) ->
    image_fetch_refused; a FIFO inside the roots, and paths that fail with other OS
    errors (NUL, ENOTDIR, ELOOP, ENAMETOOLONG).
test_fuzz_decode.py
    hypothesis mutations (bit flips, byte sets, truncation, splices, big-endian/little-
    endian dimension stamps) of small valid PNG, JPEG, GIF, BMP and WebP files through an
    InlineDecoder and (fewer) through the ProcessDecoder, which must agree with the inline
    result and survive: Cropped with RGB crops, or image_undecodable / image_too_large.

The *_BUG texts next to some tests describe bugs this suite found in consumer/ code (a
worker-killing RecursionError, crop amplification, a FIFO hang, misfiled OS errors, UTF-16
accepted as JSON, clipped 16-bit images); all are fixed and the tests keep them fixed.
"""
