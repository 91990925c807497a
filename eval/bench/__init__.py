"""Speed benchmarks, one `doublesparse bench` subcommand each: `kernels`, `decode`, `offload`, `calibration`.

`common` holds what they share (option parsing, device and thread setup, report files and figures);
`full_offload` is the FlexGen-like baseline that `offload` times against.
"""
