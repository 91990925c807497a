"""The models an evaluation or benchmark runs on: the bundled trained model or a local folder (`source`), the tiny
random-weight stand-in (`tiny_random`), real model shapes with random weights (`presets`), and where a channel mask
comes from (`channel_masks`)."""
