"""A simulated, vLLM-compatible streaming server: a test and benchmark instrument.

It serves the OpenAI completion endpoints with exactly scheduled timings,
records server-side truth per request and injects faults on demand. It never
stands in for the real vLLM in the demo or the end-to-end tests.
"""

from server.sim.config import Distribution, FaultSpec, SimConfig, load_sim_config
from server.sim.server import SimProcess, SimServer

__all__ = ["Distribution", "FaultSpec", "SimConfig", "SimServer", "SimProcess", "load_sim_config"]
