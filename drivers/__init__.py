"""Talking to devices: Modbus transports, SunSpec, register maps and typed device facades.

Imports nothing else of wattmesh's. Readings are in SI units with the project's signs:
site and meter power positive when importing, battery power positive when discharging,
PV power positive.
"""
