"""`vitdeploy bench`: latency, throughput and accuracy parity of inference backends."""
