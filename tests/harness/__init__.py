"""What the tests run on: manifest builders, the fake API server, network namespace beds, the traffic daemon, scenarios.

Test modules import from here and never from each other.
"""
