"""The BTARD protocol: rounds as explicit phases over a transport."""
