"""Chat platform transports: turn platform events into inbound messages and render replies."""
