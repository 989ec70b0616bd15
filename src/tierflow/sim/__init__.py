"""The discrete-event model: a GPU compute stream, links, NVMe SSDs and DRAM staging buffers as SimPy
processes, wired by :mod:`tierflow.sim.engine`."""
