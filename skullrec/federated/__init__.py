"""Federated training on Flower: site folders, the non-IID split maker, the ServerApp and the ClientApp.

- ``sites.py``: a data set -> N site data sets with different defect mixes and sizes (``skullrec sites``);
  the checks every site folder must pass.
- ``client_app.py``: the Flower ClientApp each site runs: skullrec's own ``train_step`` locally.
- ``server_app.py``: the Flower ServerApp: FedAvg, or FedAvg + server-side SWA; checkpoints, resume, metrics.
- ``run.py``: ``skullrec federate``: a SuperLink and one SuperNode per site on 127.0.0.1, then ``flwr run``.
"""
