"""Queue consumer: LISTEN + poll, claiming with leases, reading images, writing results. Knows no HTTP."""
