"""What the Sage sandbox must already hold for the generated Stripe business.

An eCommerce platform pushed some customers and their sales orders into Sage before payment;
those Stripe charges carry ``metadata.erp_order_id`` and their customers
``metadata.sage_customer_id``. This builds exactly those Sage records from the business.
"""

from __future__ import annotations

import datetime as dt

from devkit.sandbox.sage_seed import SeedCustomer, SeedLine, SeedSalesOrder
from devkit.sandbox.stripe_state import StripeWorld


def sage_seed_for(world: StripeWorld) -> tuple[list[SeedCustomer], list[SeedSalesOrder]]:
    b = world.b
    customers: dict[int, SeedCustomer] = {}
    orders: list[SeedSalesOrder] = []
    # The shop pushed every customer it knows (one in ten carries a Sage id) ...
    for k in range(0, len(b.customers), 10):
        sage_id = b.sage_customer_id(k)
        assert sage_id is not None
        attrs = world._customer_attrs(k)
        customers[k] = SeedCustomer(
            customer_id=sage_id,
            name=attrs["name"][:40],  # the shop truncated it when it pushed the record
            email=attrs["email"],
            currency="USD",
            reference=world.make_id("customers", k),
        )
    # ... and a sales order for every charge that carries metadata.erp_order_id, except the
    # few orders that never reached Sage (``Business.ch_erp_unknown``).
    for i in b.erp_charges.tolist():
        ch = world.charge(i)
        sage_id = b.sage_customer_id(ch.customer)
        assert sage_id is not None, "erp orders are placed by customers with a Sage id"
        order_no = b.erp_order_no(i)
        assert order_no is not None
        day = dt.datetime.fromtimestamp(ch.created, dt.UTC).date()
        orders.append(
            SeedSalesOrder(
                order_no=order_no,
                customer_id=sage_id,
                order_date=day,
                currency="USD",
                lines=[
                    SeedLine(
                        item="WEB-ORDER",
                        description="Web shop order",
                        quantity="1",
                        unit_price_minor=ch.amount,
                    )
                ],
                reference=f"web-{order_no.lower()}",
            )
        )
    return list(customers.values()), orders
