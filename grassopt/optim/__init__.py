"""The maths of :class:`grassopt.SubspaceAdamW`'s step as functions over explicit tensors (torch's style:
the class in :mod:`grassopt.optimizer` gathers the lists, these do the work), and the one
declaration of a parameter's state (:func:`grassopt.optim.state.state_spec`).

- ``state.py``: ``state_spec(group, shape)``, read by initialisation, by ``load_state_dict``'s checks
  (``check_state_dict``, there too) and by the memory accounting (:mod:`grassopt.memory`);
- ``groups.py``: a new param group's parameters, normalised and checked (the options' checks are
  :mod:`grassopt.options`');
- ``_plain.py``: AdamW of the plain groups;
- ``_projected.py``: the projected step (basis maintenance, Adam in the subspace, the recovery and
  APOLLO scales, the update of the weights, error feedback).
"""
