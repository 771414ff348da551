"""A Modbus device for bridgehead's tests: pymodbus (pinned, see scripts/test) serving
known register contents over TCP or RTU, logging every request it executes.

    modbus_server.py --tcp PORT --registers FILE
    modbus_server.py --rtu /dev/pts/N --baud 9600 --registers FILE

FILE is JSON: {"UNIT": {"hr": {"ADDRESS": VALUE, ...}, "ir": {...}, "co": {...}, "di": {...}}}
with 0-based addresses. Each executed request prints one line on stdout:
    REQ unit=1 fc=3 address=0 count=12
    SET unit=1 fc=5 address=5 values=[True]
"""

import argparse
import asyncio
import json
import sys

from pymodbus.datastore import (
    ModbusSequentialDataBlock,
    ModbusServerContext,
    ModbusSlaveContext,
)
from pymodbus.server import StartAsyncSerialServer, StartAsyncTcpServer
from pymodbus.transaction import ModbusRtuFramer

SIZE = 4096


class LoggingSlave(ModbusSlaveContext):
    def __init__(self, unit, **kwargs):
        super().__init__(zero_mode=True, **kwargs)
        self.unit = unit

    def getValues(self, fc_as_hex, address, count=1):
        print(f"REQ unit={self.unit} fc={fc_as_hex} address={address} count={count}", flush=True)
        return super().getValues(fc_as_hex, address, count)

    def setValues(self, fc_as_hex, address, values):
        print(f"SET unit={self.unit} fc={fc_as_hex} address={address} values={list(values)}", flush=True)
        return super().setValues(fc_as_hex, address, values)


def block(table, bits):
    values = [False if bits else 0] * SIZE
    for address, value in table.items():
        values[int(address)] = value
    return ModbusSequentialDataBlock(0, values)


def context(registers):
    slaves = {}
    for unit, tables in registers.items():
        slaves[int(unit)] = LoggingSlave(
            int(unit),
            hr=block(tables.get("hr", {}), False),
            ir=block(tables.get("ir", {}), False),
            co=block(tables.get("co", {}), True),
            di=block(tables.get("di", {}), True),
        )
    return ModbusServerContext(slaves=slaves, single=False)


async def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--tcp", type=int)
    parser.add_argument("--rtu")
    parser.add_argument("--baud", type=int, default=9600)
    parser.add_argument("--registers", required=True)
    args = parser.parse_args()
    with open(args.registers) as f:
        ctx = context(json.load(f))
    print("READY", flush=True)
    if args.tcp:
        await StartAsyncTcpServer(context=ctx, address=("127.0.0.1", args.tcp))
    else:
        await StartAsyncSerialServer(
            context=ctx, framer=ModbusRtuFramer, port=args.rtu, baudrate=args.baud
        )


if __name__ == "__main__":
    try:
        asyncio.run(main())
    except KeyboardInterrupt:
        sys.exit(0)
