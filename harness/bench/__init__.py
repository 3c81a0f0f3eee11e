"""`make bench`: latency, throughput, RSS and start-up of driver_plugin.py vs the direct path."""
